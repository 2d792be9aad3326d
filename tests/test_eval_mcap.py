"""rosbag2 (MCAP) replay source on bags written by the synthetic writer from hand-built scenes
(straight at 10 m/s, constant left and right turns), plus bags rewritten here with broken or raw images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sim_writer_fixtures import FRONT, make_scene, render

from blockpilot.eval.mcap import Rosbag2Source
from blockpilot.eval.mcap_track import OdomTrack, select_keyframes
from blockpilot.eval.types import DatasetError, EvalSample, SampleError, SampleFailure
from blockpilot.sim.writers.mcap_writer import write_rosbag2

S = 1_000_000_000
START = 1_700_000_000 * S  # the writer's clock for the first scene; one hour more per scene
R = 10 / 0.08  # turn radius: 10 m/s at 0.08 rad/s
IMAGE = "/camera/front/image_raw/compressed"
RAW = "/camera/raw"


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bags")
    write_rosbag2(make_scene(7, 0.0, "go straight"), root / "a-straight", camera=FRONT, render=render,
                  camera_rate_hz=10.0)
    write_rosbag2(make_scene(8, 0.08, "turn left"), root / "b-left", camera=FRONT, render=render,
                  camera_rate_hz=5.0, ordinal=1)
    write_rosbag2(make_scene(9, -0.08, "turn right"), root / "c-right", camera=FRONT, render=render,
                  camera_rate_hz=2.0, ordinal=2)
    (root / "notes").mkdir()  # not a bag: skipped
    return root


def _samples(source: Rosbag2Source) -> list[EvalSample]:
    items = list(source)
    assert len(items) == len(source)
    assert all(isinstance(i, EvalSample) for i in items), [i for i in items if isinstance(i, SampleFailure)]
    return [i for i in items if isinstance(i, EvalSample)]


def _arc(t: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """Ego-frame positions at times ``t`` on a circle of radius R turning left (sign 1) or right (-1)."""
    phi = 0.08 * np.asarray(t)
    return np.column_stack([R * np.sin(phi), sign * R * (1 - np.cos(phi))])


def test_straight_bag(bags: Path) -> None:
    source = Rosbag2Source(bags / "a-straight")
    samples = _samples(source)
    assert source.name == "mcap" and len(samples) == 17  # 2.0 s .. 10.0 s every 0.5 s
    assert [s.timestamp_us * 1000 - START for s in samples] == [2 * S + k * S // 2 for k in range(17)]
    first = samples[0]
    assert first.sample_id == f"mcap/a-straight/{START + 2 * S}" and first.scene == "a-straight"
    assert first.source == "mcap" and first.agents is None and first.frame == "ego" and first.raters == ()
    for sample in samples:
        np.testing.assert_allclose(sample.ego.past_waypoints, [[-20, 0], [-15, 0], [-10, 0], [-5, 0]], atol=1e-9)
        assert sample.ego.speed_mps == pytest.approx(10) and sample.ego.accel_mps2 == pytest.approx(0, abs=1e-9)
        assert sample.route_command == "go straight"
        assert sample.extra["route_command_from"] == "topic" and sample.extra["accel_from"] == "imu"
    assert first.future is not None and first.future.valid.all()
    np.testing.assert_allclose(first.future.times_s, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    np.testing.assert_allclose(first.future.xy, np.column_stack([10 * first.future.times_s, np.zeros(6)]), atol=1e-9)
    at_8s = samples[12]  # the bag ends at 10 s: 2.5 s and 3 s ahead are past the last odometry
    assert at_8s.timestamp_us * 1000 - START == 8 * S and at_8s.future is not None
    assert at_8s.future.valid.tolist() == [True, True, True, True, False, False]
    np.testing.assert_allclose(at_8s.future.xy, [[5, 0], [10, 0], [15, 0], [20, 0], [20, 0], [20, 0]], atol=1e-9)
    last = samples[-1]
    assert last.future is not None and not last.future.valid.any()
    images = first.load_images()
    assert first.image_names == (IMAGE,) and len(images) == 1
    assert images[0].shape == (48, 64, 3) and images[0].dtype == np.uint8
    assert source.describe()["bags"] == ["a-straight"] and source.describe()["samples"] == 17


def test_turning_bags_and_keyframe_grid(bags: Path) -> None:
    left = _samples(Rosbag2Source(bags / "b-left"))
    # images every 0.2 s: the first at or after 2.0, 2.5, 3.0, ... s
    expected = [2.0 + 0.5 * k + (0.1 if k % 2 else 0.0) for k in range(16)] + [10.0]
    np.testing.assert_allclose([(s.timestamp_us * 1000 - START - 3600 * S) / S for s in left], expected, atol=1e-9)
    sample = left[1]  # t0 = 2.6 s
    assert sample.route_command == "turn left" and sample.extra["route_command_from"] == "topic"
    np.testing.assert_allclose(sample.ego.past_waypoints, _arc(np.array([-2.0, -1.5, -1.0, -0.5])), atol=1e-6)
    assert sample.future is not None
    np.testing.assert_allclose(sample.future.xy, _arc(sample.future.times_s), atol=1e-6)
    assert sample.ego.speed_mps == pytest.approx(10, abs=1e-3)
    right = _samples(Rosbag2Source(bags / "c-right"))
    assert len(right) == 17 and {s.route_command for s in right} == {"turn right"}
    assert right[2].future is not None
    np.testing.assert_allclose(right[2].future.xy, _arc(right[2].future.times_s, -1.0), atol=1e-6)


def test_route_from_future_and_accel_from_speed(bags: Path) -> None:
    source = Rosbag2Source(bags, route_topic="/no_route", imu_topic=None)
    samples = _samples(source)
    assert source.describe()["bags"] == ["a-straight", "b-left", "c-right"] and len(samples) == 51
    by_bag: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_bag.setdefault(s.scene, []).append(s)
        assert s.sample_id.startswith(f"mcap/{s.scene}/")
        assert s.extra["route_command_from"] == "gt_future" and s.extra["accel_from"] == "speed_difference"
        assert s.ego.accel_mps2 == pytest.approx(0, abs=1e-3)
    assert {s.route_command for s in by_bag["a-straight"]} == {"go straight"}
    # 3 s ahead on the arc is 3.58 m to the side; near the end only a short, nearly straight future is valid
    assert by_bag["b-left"][0].route_command == "turn left" and by_bag["c-right"][0].route_command == "turn right"
    assert by_bag["b-left"][-3].route_command == "go straight"  # t0 = 9 s: last valid point 1 s ahead, 0.4 m left


def test_select_keyframes_skips_a_gap() -> None:
    odom = OdomTrack.from_rows([(0, 0.0, 0.0, 0.0, 0.0), (10 * S, 100.0, 0.0, 0.0, 10.0)])
    images = [int(t * S) for t in (1.0, 2.0, 2.1, 3.7, 3.8, 4.0, 4.2, 4.6, 10.0, 10.2)]
    assert select_keyframes(images, odom, 2 * S, S // 2) == [1, 3, 5, 7, 8]


def test_missing_paths_and_topics(tmp_path: Path, bags: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        Rosbag2Source(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"no metadata\.yaml"):
        Rosbag2Source(bags / "notes")
    with pytest.raises(DatasetError, match=r"no topic /odometry; its topics: .*/odom \(nav_msgs/msg/Odometry\)"):
        Rosbag2Source(bags / "a-straight", odom_topic="/odometry")
    with pytest.raises(DatasetError, match="no topic /camera/rear"):
        Rosbag2Source(bags, image_topic="/camera/rear")
    with pytest.raises(DatasetError, match="topic /odom is nav_msgs/msg/Odometry, expected sensor_msgs"):
        Rosbag2Source(bags / "a-straight", image_topic="/odom")


def _raw_image(store: Any, stamp: int, k: int) -> tuple[Any, np.ndarray]:
    """A 4x5 raw image (rgb8, bgr8 or mono8 by turn, rows padded) and the RGB it must decode to."""
    t = store.types
    encoding = ("rgb8", "bgr8", "mono8")[k % 3]
    channels = 1 if encoding == "mono8" else 3
    pixels = (np.arange(4 * 5 * channels, dtype=np.uint8) * 7 + k).reshape(4, 5, channels)
    step = 5 * channels + 2
    data = np.zeros((4, step), np.uint8)
    data[:, : 5 * channels] = pixels.reshape(4, -1)
    rgb = np.repeat(pixels, 3, axis=2) if channels == 1 else pixels[..., ::-1] if encoding == "bgr8" else pixels
    sec, nanosec = divmod(stamp, S)
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                      frame_id="camera")
    msg = t["sensor_msgs/msg/Image"](header=header, height=4, width=5, encoding=encoding, is_bigendian=0,
                                     step=step, data=data.ravel())
    return msg, rgb


@pytest.fixture(scope="module")
def rewritten(bags: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, np.ndarray]]:
    """The straight bag with its 4.0 s image cut short and a raw image topic at 2 Hz added."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    out = tmp_path_factory.mktemp("rewritten") / "broken"
    raw_expected: dict[int, np.ndarray] = {}
    with AnyReader([bags / "a-straight"]) as reader, Writer(out, version=8, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {c.topic: w.add_connection(c.topic, c.msgtype, typestore=store) for c in reader.connections}
        conns[RAW] = w.add_connection(RAW, "sensor_msgs/msg/Image", typestore=store)
        for conn, stamp, data in reader.messages(reader.connections):
            if conn.topic == IMAGE and stamp == START + 4 * S:
                msg = reader.deserialize(data, conn.msgtype)
                msg.data = msg.data[: len(msg.data) // 2]
                data = store.serialize_cdr(msg, conn.msgtype)
            w.write(conns[conn.topic], stamp, data)
            if conn.topic == "/odom" and (stamp - START) % (S // 2) == 0:
                msg, raw_expected[stamp] = _raw_image(store, stamp, len(raw_expected))
                w.write(conns[RAW], stamp, store.serialize_cdr(msg, msg.__msgtype__))
    return out, raw_expected


def test_corrupt_jpeg_fails_on_load_only(rewritten: tuple[Path, dict[int, np.ndarray]]) -> None:
    samples = _samples(Rosbag2Source(rewritten[0]))
    assert len(samples) == 17
    broken = [s for s in samples if s.timestamp_us * 1000 == START + 4 * S]
    assert len(broken) == 1
    with pytest.raises(SampleError, match=f"{IMAGE} at {START + 4 * S} ns: corrupt image"):
        broken[0].load_images()
    for sample in samples:
        if sample is not broken[0]:
            assert sample.load_images()[0].shape == (48, 64, 3)


def test_raw_images(rewritten: tuple[Path, dict[int, np.ndarray]]) -> None:
    path, expected = rewritten
    samples = _samples(Rosbag2Source(path, image_topic=RAW))
    assert len(samples) == 17 and samples[0].image_names == (RAW,)
    for sample in samples[:3]:  # one of each encoding (bgr8, mono8, rgb8 from 2 s on)
        np.testing.assert_array_equal(sample.load_images()[0], expected[sample.timestamp_us * 1000])
