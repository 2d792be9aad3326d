"""ROS message <-> numpy conversions and the diagnostics builder of the planner node (pure: no DDS)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from nav_msgs.msg import Odometry
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image

from blockpilot.ros_nodes.conversions import (
    PAST_TIMES_S,
    ConversionError,
    ImageError,
    OdometryError,
    OdomHistory,
    image_from_compressed,
    image_from_raw,
    odom_sample,
    path_msg,
    plan_json,
    pose_array_msg,
    stamp_ns,
    time_msg,
)
from blockpilot.ros_nodes.diagnostics import OUTCOME_LEVELS, FrameSlot, PlannerDiagnostics, status_values
from blockpilot.runtime.plan_stats import PlanStats
from blockpilot.runtime.plan_types import Plan
from blockpilot.vla.plans import DrivingPlan

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
S = 1_000_000_000


def _raw(pixels: np.ndarray, encoding: str, pad: int = 0, cut: int = 0) -> Image:
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.zeros((h, w * channels + pad), np.uint8)
    rows[:, : w * channels] = pixels.reshape(h, -1)
    data = rows.tobytes()
    msg = Image(height=h, width=w, encoding=encoding, step=w * channels + pad)
    msg.data = data[: len(data) - cut]
    return msg


@pytest.mark.parametrize("pad", [0, 3])
def test_raw_images_in_every_encoding(pad: int) -> None:
    assert np.array_equal(image_from_raw(_raw(PICTURE, "rgb8", pad)), PICTURE)
    assert np.array_equal(image_from_raw(_raw(PICTURE[..., ::-1], "bgr8", pad)), PICTURE)
    alpha = np.full((*PICTURE.shape[:2], 1), 7, np.uint8)
    assert np.array_equal(image_from_raw(_raw(np.concatenate([PICTURE, alpha], 2), "rgba8", pad)), PICTURE)
    assert np.array_equal(image_from_raw(_raw(np.concatenate([PICTURE[..., ::-1], alpha], 2), "bgra8", pad)), PICTURE)
    mono = image_from_raw(_raw(PICTURE[..., 0], "mono8", pad))
    assert mono.shape == PICTURE.shape and np.array_equal(mono[..., 2], PICTURE[..., 0])
    out = image_from_raw(_raw(PICTURE, "RGB8", pad))
    assert out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize(("msg", "text"), [
    (_raw(PICTURE, "rgb8", cut=1), "data bytes do not hold a 5x6 rgb8 image"),
    (_raw(PICTURE, "rgb8", pad=2, cut=2), "do not hold"),
    (_raw(PICTURE, "yuv422"), "unsupported image encoding"),
    (Image(height=0, width=4, encoding="rgb8", step=12), "empty or too large"),
    (Image(height=2, width=4, encoding="rgb8", step=10), "row step 10 is shorter"),
])
def test_malformed_raw_images_raise(msg: Image, text: str) -> None:
    with pytest.raises(ImageError, match=text) as info:
        image_from_raw(msg)
    assert info.value.kind == "malformed_image"


def test_longer_data_than_the_header_says_is_refused() -> None:
    msg = _raw(PICTURE, "rgb8")
    msg.data = bytes(msg.data) + b"\x00" * 5
    with pytest.raises(ImageError, match="do not hold"):
        image_from_raw(msg)


def _compressed(pixels: np.ndarray, fmt: str) -> CompressedImage:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format=fmt.upper())
    msg = CompressedImage(format=fmt)
    msg.data = buf.getvalue()
    return msg


def test_compressed_images() -> None:
    assert np.array_equal(image_from_compressed(_compressed(PICTURE, "png")), PICTURE)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 1, 3))
    decoded = image_from_compressed(_compressed(smooth, "jpeg"))
    assert decoded.shape == (16, 32, 3) and np.abs(decoded.astype(int) - smooth).max() < 12
    assert image_from_compressed(_compressed(PICTURE[..., 0], "png")).shape == PICTURE.shape  # grey -> RGB


@pytest.mark.parametrize(("data", "text"), [(b"", "has no data"), (b"\x89PNG\r\n\x1a\n broken", "cannot be decoded"),
                                            (b"definitely not an image", "cannot be decoded")])
def test_corrupt_compressed_images_raise(data: bytes, text: str) -> None:
    msg = CompressedImage(format="png")
    msg.data = data
    with pytest.raises(ImageError, match=text):
        image_from_compressed(msg)


def _odom(t_ns: int, x: float = 0.0, y: float = 0.0, yaw: float = 0.0, speed: float = 0.0) -> Odometry:
    msg = Odometry()
    msg.header.stamp = time_msg(t_ns)
    msg.pose.pose.position.x, msg.pose.pose.position.y = x, y
    msg.pose.pose.orientation.z, msg.pose.pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
    msg.twist.twist.linear.x = speed
    msg.twist.twist.angular.z = 0.1
    return msg


def test_stamps_round_trip() -> None:
    assert stamp_ns(time_msg(1_700_000_000_123_456_789)) == 1_700_000_000_123_456_789


def test_odometry_sample() -> None:
    s = odom_sample(_odom(5 * S + 7, x=1.0, y=2.0, yaw=2.5, speed=3.0))
    assert (s.stamp_ns, s.x, s.y, s.speed_mps, s.yaw_rate) == (5 * S + 7, 1.0, 2.0, 3.0, 0.1)
    assert s.yaw == pytest.approx(2.5)


@pytest.mark.parametrize("field", ["position.x", "position.y", "orientation.w", "twist.linear.x"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_odometry_names_the_field(field: str, bad: float) -> None:
    msg = _odom(S)
    if field.startswith("twist"):
        msg.twist.twist.linear.x = bad
    else:
        part, axis = field.split(".")
        setattr(getattr(msg.pose.pose, part), axis, bad)
    with pytest.raises(OdometryError, match=field.replace(".", r"\.")) as info:
        odom_sample(msg)
    assert info.value.kind == "nonfinite_odometry"


def test_zero_quaternion_is_refused() -> None:
    msg = _odom(S)
    msg.pose.pose.orientation.w = 0.0
    with pytest.raises(OdometryError, match="zero norm"):
        odom_sample(msg)


def _history(yaw: float = 0.3, speed: float = 4.0, accel: float = 0.0, seconds: float = 3.0,
             rate_hz: float = 20.0, t0: int = 100 * S) -> OdomHistory:
    history = OdomHistory()
    for i in range(int(seconds * rate_hz) + 1):
        t = i / rate_hz
        dist = speed * t + 0.5 * accel * t * t
        history.add(odom_sample(_odom(t0 + round(t * 1e9), 10 + dist * math.cos(yaw), -5 + dist * math.sin(yaw),
                                      yaw, speed + accel * t)))
    return history


def test_ego_state_on_a_straight_line() -> None:
    history = _history(yaw=0.3, speed=4.0, accel=1.0)
    at = 103 * S
    ego = history.ego_state(at, max_age_ns=S // 4)
    t = np.array(PAST_TIMES_S) + 3.0
    dist_now = 4.0 * 3 + 0.5 * 9
    expected = 4.0 * t + 0.5 * t * t - dist_now
    np.testing.assert_allclose(ego.past_waypoints[:, 0], expected, atol=0.02)  # behind the car on its own axis
    np.testing.assert_allclose(ego.past_waypoints[:, 1], 0.0, atol=1e-9)
    assert ego.speed_mps == pytest.approx(7.0) and ego.accel_mps2 == pytest.approx(1.0)


def test_ego_state_matches_the_training_keyframes() -> None:
    from blockpilot.sim.generator import generate_scene
    from blockpilot.sim.samples import PAST_TIMES_S as SIM_PAST
    from blockpilot.sim.samples import keyframe_at

    assert PAST_TIMES_S == SIM_PAST
    scene = generate_scene(1_000_001)
    history = OdomHistory()
    for step, (x, y, yaw, speed, _) in enumerate(scene.ego.states[:60]):
        history.add(odom_sample(_odom(round(step * scene.dt * 1e9), x, y, yaw, speed)))
    step = 50
    ego = history.ego_state(round(step * scene.dt * 1e9), max_age_ns=S)
    key = keyframe_at(scene, step)
    np.testing.assert_allclose(ego.past_waypoints, key.past_xy, atol=1e-6)
    assert ego.speed_mps == pytest.approx(key.speed)


def test_ego_state_refusals() -> None:
    history = OdomHistory()
    with pytest.raises(OdometryError, match="no odometry received yet") as info:
        history.ego_state(S, S)
    assert info.value.kind == "no_odometry"
    history = _history()
    newest = 103 * S
    with pytest.raises(OdometryError, match=r"stale odometry: the newest is 300\.0 ms older") as info:
        history.ego_state(newest + 300_000_000, max_age_ns=250_000_000)
    assert info.value.kind == "stale_odometry"
    short = _history(seconds=1.0)
    with pytest.raises(OdometryError, match=r"covers 1\.00 s") as info:
        short.ego_state(101 * S, max_age_ns=S)
    assert info.value.kind == "short_history"
    history.refuse(OdometryError("odometry holds non-finite values in twist.linear.x", "nonfinite_odometry"))
    with pytest.raises(OdometryError, match="latest odometry refused") as info:
        history.ego_state(newest, S)
    assert info.value.kind == "nonfinite_odometry"
    history.add(odom_sample(_odom(newest + 50_000_000, x=22.0)))  # a good message clears the fault
    assert history.ego_state(newest, S).past_waypoints.shape == (4, 2)


def test_history_is_bounded_and_restarts_when_the_clock_jumps_back() -> None:
    history = _history(seconds=10.0, rate_hz=50.0)
    assert len(history) == 3 * 50 + 1  # three seconds kept
    history.add(odom_sample(_odom(5 * S)))
    assert len(history) == 1
    small = OdomHistory(max_samples=10)
    for i in range(50):
        small.add(odom_sample(_odom(i * 1000)))
    assert len(small) == 10


def test_path_and_pose_array() -> None:
    waypoints = np.array([[1.0, 0.0], [2.0, 1.0], [2.0, 1.0], [2.0, 3.0]])
    path = path_msg(waypoints, 12 * S + 5, "base_link")
    assert path.header.frame_id == "base_link" and stamp_ns(path.header.stamp) == 12 * S + 5
    assert len(path.poses) == 4
    assert all(p.header.frame_id == "base_link" and stamp_ns(p.header.stamp) == 12 * S + 5 for p in path.poses)
    yaws = [2 * math.atan2(p.pose.orientation.z, p.pose.orientation.w) for p in path.poses]
    np.testing.assert_allclose(yaws, [0.0, math.pi / 4, math.pi / 4, math.pi / 2])  # a repeated point keeps its heading
    assert [p.pose.position.x for p in path.poses] == [1.0, 2.0, 2.0, 2.0]
    arm = pose_array_msg(np.array([[0.1, 0.2, 0.3], [0.2, 0.2, 0.4]]), 3, "tool0")
    assert arm.header.frame_id == "tool0" and [p.position.z for p in arm.poses] == [0.3, 0.4]
    with pytest.raises(ConversionError, match="finite"):
        path_msg(np.array([[1.0, math.nan]]), 0, "base_link")
    with pytest.raises(ConversionError, match="shape"):
        pose_array_msg(np.zeros((3, 4)), 0, "base_link")


def _plan(waypoints: np.ndarray | None) -> Plan:
    stats = PlanStats(decoder="scaffold", settings={"name": "scaffold"}, forwards=3, row_forwards=3,
                      prefill_forwards=1, decode_forwards=2, tokens=10, rows=1, tokens_per_forward=5.0,
                      prompt_tokens=50, image_tokens=16, stop="end", stage_ms={"total": 12.5, "odd": math.nan})
    plan = None if waypoints is None else DrivingPlan(waypoints, "keep_speed", "straight", {"pedestrian": True})
    return Plan(plan, None, "text", stats, np.zeros((1, 10), np.int64))


def test_plan_json_is_strict_json() -> None:
    text = plan_json(_plan(np.array([[1.0, 0.0], [2.0, 0.1]])), stamp=42, frame_id="base_link", latency_ms=3.5)
    body = json.loads(text)
    assert body["stamp_ns"] == 42 and body["frame_id"] == "base_link" and body["latency_ms"] == 3.5
    assert body["waypoints"] == [[1.0, 0.0], [2.0, 0.1]] and body["critical_objects"] == ["pedestrian"]
    assert body["stats"]["stage_ms"]["odd"] is None  # NaN is not JSON
    assert "NaN" not in text


def test_diagnostics_account_every_frame() -> None:
    diag = PlannerDiagnostics("planner", "torch/cpu", {"state": "active"})
    for _ in range(6):
        diag.received()
    diag.outcome("planned", "planned in 80.0 ms", stamp_ns=7, stage_ms={"decode": 60.0, "total": 80.0},
                 latency_ms=85.0)
    diag.outcome("dropped_busy")
    diag.outcome("stale_odometry", "/odom: stale odometry", stamp_ns=8)
    assert diag.status() == (DiagnosticStatus.WARN, "/odom: stale odometry")
    diag.outcome("malformed_image", "/camera: 3 data bytes do not hold", stamp_ns=9)
    diag.waiting(+1)
    diag.in_flight(+1)
    diag.odometry(False)
    diag.route(False, "route command 'up' refused")
    diag.set_detail("state", "inactive")
    array = diag.array(time_msg(5 * S))
    assert stamp_ns(array.header.stamp) == 5 * S and len(array.status) == 1
    status = array.status[0]
    assert status.level == DiagnosticStatus.WARN and status.message == "route command 'up' refused"
    assert status.name == "planner" and status.hardware_id == "torch/cpu"
    v = status_values(status)
    assert v["state"] == "inactive" and v["frames_received"] == "6" and v["frames_planned"] == "1"
    assert v["frames_dropped_busy"] == "1" and v["frames_diagnosed"] == "2" and v["stale_inputs"] == "1"
    assert v["malformed_images"] == "1" and v["frames_waiting"] == v["frames_in_flight"] == "1"
    assert v["odometry_refused"] == "1" and v["route_refused"] == "1" and v["last_frame_stamp_ns"] == "9"
    assert v["latency_ms_last"] == "85.00" and v["stage_ms.decode"] == "60.00"
    counted = sum(int(v[f"frames_{k}"]) for k in OUTCOME_LEVELS) + 2
    assert counted == int(v["frames_received"])
    with pytest.raises(ValueError, match="unknown outcome"):
        diag.outcome("vanished")


def test_levels() -> None:
    diag = PlannerDiagnostics("planner", "onnxruntime")
    assert diag.status() == (DiagnosticStatus.OK, "waiting for camera frames")
    diag.outcome("nonfinite_odometry", "odometry holds non-finite values")
    assert diag.status()[0] == DiagnosticStatus.ERROR
    diag.outcome("dropped_busy")  # counts only
    assert diag.status()[0] == DiagnosticStatus.ERROR
    diag.outcome("deadline_miss", "late")
    assert diag.status() == (DiagnosticStatus.WARN, "late")


def test_frame_slot_keeps_the_newest_frame_and_counts_every_one() -> None:
    diag = PlannerDiagnostics("planner", "torch/cpu")
    slot: FrameSlot[str] = FrameSlot(diag)
    slot.offer("early", 1)  # inactive
    slot.set_active(True)
    slot.offer("a", 2)
    slot.offer("a again", 2)  # the same stamp on the other camera topic
    slot.offer("b", 3)  # replaces a: dropped as busy
    assert slot.take() == "b"
    slot.offer("c", 4)
    counts = diag.counts()
    assert (counts["frames_in_flight"], counts["frames_waiting"]) == (1, 1)
    slot.done()
    diag.outcome("planned", "planned")
    slot.set_active(False)  # c was waiting: inactive
    counts = diag.counts()
    assert counts["frames_received"] == 5 and counts["frames_inactive"] == 2 and counts["frames_duplicate"] == 1
    assert counts["frames_dropped_busy"] == 1 and counts["frames_planned"] == 1
    assert counts["frames_waiting"] == counts["frames_in_flight"] == 0
    assert sum(counts[f"frames_{k}"] for k in OUTCOME_LEVELS) == counts["frames_received"]


def test_frame_slot_close_releases_the_waiting_thread() -> None:
    import threading

    slot: FrameSlot[str] = FrameSlot(PlannerDiagnostics("planner", "none"))
    taken: list[str | None] = []
    thread = threading.Thread(target=lambda: taken.append(slot.take()))
    thread.start()
    slot.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and taken == [None]
    slot.offer("late", 1)
    assert slot.diagnostics.counts()["frames_inactive"] == 1 and not slot.active
