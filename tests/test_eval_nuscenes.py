"""The nuScenes replay source on tiny synthetic dataroots whose motion is known exactly.

Scene 1 (``scene-0001``) drives straight at 10 m/s, scene 2 (``scene-0002``) turns left at 0.08 rad/s
and 10 m/s; keyframes every 0.5 s for 10 s (21 per scene). Every expected number below comes from
that motion, not from the reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sim_writer_fixtures import FRONT, make_scene, render

from blockpilot.eval.nuscenes import NuScenesSource
from blockpilot.eval.types import DatasetError, EvalSample, SampleError, SampleFailure, Trajectory
from blockpilot.sim.writers.nuscenes import LIDAR_MOUNT, VERSION, write_nuscenes

OMEGA, RADIUS = 0.08, 10 / 0.08
TAU = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
PER_SCENE = 21


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenes = [make_scene(7, 0.0, "go straight"), make_scene(8, OMEGA, "turn left")]
    return write_nuscenes(scenes, tmp_path_factory.mktemp("nus") / "root", camera=FRONT,
                          render=render)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ego_items(root: Path) -> list[EvalSample | SampleFailure]:
    return list(NuScenesSource(root))


@pytest.fixture(scope="module")
def lidar_items(root: Path) -> list[EvalSample | SampleFailure]:
    return list(NuScenesSource(root, frame="lidar"))


def _ok(item: EvalSample | SampleFailure) -> EvalSample:
    assert isinstance(item, EvalSample), item
    return item


def _gt(sample: EvalSample) -> Trajectory:
    assert sample.future is not None
    return sample.future


def _circle(tau: np.ndarray) -> np.ndarray:
    """Positions of the turning ego at t0 + tau in its own frame at t0."""
    return np.column_stack([RADIUS * np.sin(OMEGA * tau), RADIUS * (1 - np.cos(OMEGA * tau))])


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _table(root: Path, name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((root / VERSION / f"{name}.json").read_text())
    return rows


def _write_table(root: Path, name: str, rows: list[dict[str, Any]]) -> None:
    (root / VERSION / f"{name}.json").write_text(json.dumps(rows))


def test_order_length_and_skipped_history(root: Path, ego_items: list[Any]) -> None:
    source = NuScenesSource(root)
    assert source.name == "nuscenes" and len(source) == len(ego_items) == 2 * PER_SCENE
    assert [i.scene for i in ego_items] == ["scene-0001"] * PER_SCENE + ["scene-0002"] * PER_SCENE
    for start in (0, PER_SCENE):
        head = ego_items[start : start + 4]
        assert all(isinstance(i, SampleFailure) and i.kind == "skipped" for i in head)
        assert all("needs 2.0 s of history" in i.reason for i in head)
    assert sum(isinstance(i, EvalSample) for i in ego_items) == 2 * (PER_SCENE - 4)
    stamps = [i.timestamp_us for i in ego_items[4:PER_SCENE]]
    assert set(np.diff(stamps)) == {500_000}
    assert len({i.sample_id for i in ego_items}) == len(ego_items)
    facts = json.loads(json.dumps(source.describe()))  # JSON-ready
    assert set(facts) >= {"dataroot", "version", "frame", "cameras", "scenes", "samples"}
    assert facts["version"] == VERSION and facts["samples"] == 42 and facts["cameras"] == ["CAM_FRONT"]


def test_straight_scene_in_the_ego_frame(ego_items: list[Any]) -> None:
    s = _ok(ego_items[4])  # t0 = 2.0 s
    assert s.sample_id == f"nuscenes/{s.extra['sample_token']}" and s.source == "nuscenes"
    np.testing.assert_allclose(s.ego.past_waypoints, [[-20, 0], [-15, 0], [-10, 0], [-5, 0]], atol=1e-5)
    np.testing.assert_allclose(_gt(s).xy, np.column_stack([10 * TAU, 0 * TAU]), atol=1e-5)
    assert _gt(s).valid.all() and _gt(s).times_s.tolist() == TAU.tolist()
    assert s.ego.speed_mps == pytest.approx(10.0) and s.ego.accel_mps2 == pytest.approx(0.0, abs=1e-6)
    assert s.extra["ego_state_from"] == "can_bus" and s.extra["route_command_from"] == "gt_future"
    assert s.route_command == "go straight" and s.frame == "ego"
    assert s.ego_box_offset_m == pytest.approx(0.5 + LIDAR_MOUNT[0])
    assert len(s.image_names) == 1 and s.image_names[0].startswith("samples/CAM_FRONT/")


def test_future_validity_at_the_scene_end(ego_items: list[Any]) -> None:
    s = _ok(ego_items[17])  # t0 = 8.5 s: keyframes at 9.0, 9.5, 10.0 s remain
    assert _gt(s).valid.tolist() == [True, True, True, False, False, False]
    np.testing.assert_allclose(_gt(s).xy, [[5, 0], [10, 0], [15, 0], [15, 0], [15, 0], [15, 0]], atol=1e-5)
    assert s.agents is not None and [len(b) for b in s.agents.boxes][3:] == [0, 0, 0]
    last = _ok(ego_items[20])
    assert not _gt(last).valid.any() and not _gt(last).xy.any() and last.route_command == "go straight"


def test_turning_scene_follows_the_circle(ego_items: list[Any]) -> None:
    s = _ok(ego_items[PER_SCENE + 10])  # t0 = 5.0 s
    np.testing.assert_allclose(_gt(s).xy, _circle(TAU), atol=1e-4)
    np.testing.assert_allclose(s.ego.past_waypoints, _circle(np.array([-2.0, -1.5, -1.0, -0.5])), atol=1e-4)
    assert np.all(np.diff(_gt(s).xy[:, 1]) > 0) and _gt(s).xy[-1, 1] > 2.0
    assert s.route_command == "turn left"
    assert s.ego.speed_mps == pytest.approx(10.0, abs=1e-3)
    # with only 0.5 s of future left the lateral offset is 0.1 m: no turn command
    assert _ok(ego_items[PER_SCENE + 19]).route_command == "go straight"


def test_lidar_frame(ego_items: list[Any], lidar_items: list[Any]) -> None:
    mount = np.array(LIDAR_MOUNT[:2])
    straight_ego, straight_lidar = _ok(ego_items[6]), _ok(lidar_items[6])
    np.testing.assert_allclose(_gt(straight_lidar).xy, _gt(straight_ego).xy, atol=1e-5)
    assert straight_lidar.frame == "lidar" and straight_lidar.ego_box_offset_m == 0.5
    assert straight_lidar.extra["lidar_turn_deg"] == -90
    np.testing.assert_allclose(straight_lidar.ego.past_waypoints, straight_ego.ego.past_waypoints)
    assert straight_lidar.route_command == straight_ego.route_command
    turn_ego, turn_lidar = _ok(ego_items[PER_SCENE + 10]), _ok(lidar_items[PER_SCENE + 10])
    c, s = np.cos(OMEGA * TAU), np.sin(OMEGA * TAU)
    mount_moved = np.column_stack([c * mount[0] - s * mount[1], s * mount[0] + c * mount[1]]) - mount
    np.testing.assert_allclose(_gt(turn_lidar).xy, _gt(turn_ego).xy + mount_moved, atol=1e-4)
    assert np.abs(_gt(turn_lidar).xy - _gt(turn_ego).xy).max() > 0.1
    np.testing.assert_allclose(turn_lidar.ego.past_waypoints, turn_ego.ego.past_waypoints)
    # agents: the same boxes, seen from the sensor
    assert straight_ego.agents is not None and straight_lidar.agents is not None
    for b_ego, b_lidar in zip(straight_ego.agents.boxes, straight_lidar.agents.boxes, strict=True):
        np.testing.assert_allclose(b_lidar, b_ego - [mount[0], mount[1], 0, 0, 0], atol=1e-5)


def test_agent_boxes_straight(ego_items: list[Any]) -> None:
    s = _ok(ego_items[4])  # t0 = 2.0 s, ego at x = 20
    assert s.agents is not None and s.agents.times_s.tolist() == TAU.tolist()
    for k, tau in enumerate(TAU):
        boxes, kinds = s.agents.boxes[k], s.agents.kinds[k]
        assert kinds == ("vehicle", "pedestrian", "vehicle")  # agent 4 is out of range; the bicycle is a vehicle
        # agent 1: 20 m ahead at 8 m/s in the world; 20 + 8 * t - 20 in the t0 frame
        np.testing.assert_allclose(boxes[0], [16 + 8 * tau, 0, 0, 4.5, 1.9], atol=1e-5)
        # relative to the moving ego: 20 + 8 t - 10 t (18 m at t = 1 s)
        assert boxes[0, 0] - _gt(s).xy[k, 0] == pytest.approx(20 - 2 * (2 + tau), abs=1e-5)
        np.testing.assert_allclose(boxes[1], [10, 6 - (2 + tau), -np.pi / 2, 0.6, 0.6], atol=1e-5)
        np.testing.assert_allclose(boxes[2], [-5 + 4 * (2 + tau), 3, 0, 1.8, 0.6], atol=1e-5)
    # the pedestrian walks out of the 60 m annotation range at 9 s: not drawn at that step
    late = _ok(ego_items[12])  # t0 = 6.0 s
    assert late.agents is not None
    assert [len(k) for k in late.agents.kinds] == [3, 3, 3, 3, 3, 2]
    assert late.agents.kinds[5] == ("vehicle", "vehicle")


def test_agent_boxes_turning(ego_items: list[Any]) -> None:
    s = _ok(ego_items[PER_SCENE + 10])
    t0 = 5.0
    ego0 = _circle(np.array([t0]))[0]
    c, sn = np.cos(OMEGA * t0), np.sin(OMEGA * t0)
    assert s.agents is not None
    for k, tau in enumerate(TAU):
        d = np.array([20 + 8 * (t0 + tau), 0.0]) - ego0
        expected = [c * d[0] + sn * d[1], -sn * d[0] + c * d[1], -OMEGA * t0, 4.5, 1.9]
        np.testing.assert_allclose(s.agents.boxes[k][0], expected, atol=1e-4)


def test_images_decode(ego_items: list[Any]) -> None:
    s = _ok(ego_items[4])
    images = s.load_images()
    assert len(images) == 1 and images[0].dtype == np.uint8 and images[0].shape == (48, 64, 3)
    expected = render(make_scene(7, 0.0, "go straight"), 20, FRONT)
    assert np.abs(images[0].astype(int) - expected.astype(int)).mean() < 8


def test_stride_and_scene_filter(root: Path, ego_items: list[Any]) -> None:
    strided = list(NuScenesSource(root, keyframe_stride=3))
    assert len(strided) == len(NuScenesSource(root, keyframe_stride=3)) == 14
    expected = [i.sample_id for i in ego_items[:PER_SCENE:3]] + [i.sample_id for i in ego_items[PER_SCENE::3]]
    assert [i.sample_id for i in strided] == expected
    assert sum(isinstance(i, EvalSample) for i in strided) == 10
    only = NuScenesSource(root, scenes=["scene-0002"])
    assert len(only) == PER_SCENE and {i.scene for i in only} == {"scene-0002"}
    assert [i.sample_id for i in only] == [i.sample_id for i in ego_items[PER_SCENE:]]
    with pytest.raises(DatasetError, match="scene-0999"):
        NuScenesSource(root, scenes=["scene-0999"])
    with pytest.raises(ValueError, match="frame"):
        NuScenesSource(root, frame="world")
    with pytest.raises(ValueError, match="keyframe_stride"):
        NuScenesSource(root, keyframe_stride=0)


def test_dataset_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        NuScenesSource(tmp_path / "nowhere")
    copy = _copy(root, tmp_path)
    shutil.copytree(copy / VERSION, copy / "v1.0-mini")
    with pytest.raises(DatasetError, match="several versions") as err:
        NuScenesSource(copy)
    assert "v1.0-mini" in str(err.value) and VERSION in str(err.value)
    assert len(NuScenesSource(copy, "v1.0-mini")) == 42
    (copy / "v1.0-mini" / "ego_pose.json").write_text('[{"token": "a", ')
    with pytest.raises(DatasetError, match=r"v1\.0-mini/ego_pose\.json"):
        NuScenesSource(copy, "v1.0-mini")
    (copy / "v1.0-mini" / "sample.json").unlink()
    with pytest.raises(DatasetError, match=r"v1\.0-mini/sample\.json"):
        NuScenesSource(copy, "v1.0-mini")
    assert NuScenesSource(copy).version == VERSION  # the only folder with sample.json
    (copy / VERSION / "sample.json").unlink()
    with pytest.raises(DatasetError, match=r"no v1\.0-\* folder with sample\.json"):
        NuScenesSource(copy)
    with pytest.raises(DatasetError, match=r"v1\.0-trainval"):
        NuScenesSource(copy, "v1.0-trainval")


def test_missing_and_corrupt_images(root: Path, tmp_path: Path) -> None:
    copy = _copy(root, tmp_path)
    items = list(NuScenesSource(copy))
    missing, garbage, truncated = _ok(items[6]), _ok(items[7]), _ok(items[8])
    (copy / missing.image_names[0]).unlink()
    (copy / garbage.image_names[0]).write_bytes(b"this is not a JPEG" * 10)
    jpeg = (copy / truncated.image_names[0]).read_bytes()
    (copy / truncated.image_names[0]).write_bytes(jpeg[: len(jpeg) // 2])
    for broken in (missing, garbage, truncated):
        with pytest.raises(SampleError, match=broken.image_names[0].split("/")[-1]):
            broken.load_images()
    assert _ok(items[9]).load_images()[0].shape == (48, 64, 3)
    # iteration itself does not open the images
    assert all(isinstance(i, EvalSample) for i in list(NuScenesSource(copy))[4:PER_SCENE])


def test_missing_camera_is_a_failure(root: Path) -> None:
    items = [i for i in NuScenesSource(root, cameras=("CAM_FRONT", "CAM_BACK")) if isinstance(i, SampleFailure)]
    assert len(items) == 42
    errors = [i for i in items if i.kind == "error"]
    assert len(errors) == 34 and all("CAM_BACK" in i.reason for i in errors)


def test_removed_ego_pose_fails_only_the_samples_that_need_it(root: Path, tmp_path: Path) -> None:
    copy = _copy(root, tmp_path)
    victim = _ok(list(NuScenesSource(copy))[10]).extra["sample_token"]
    lidar = next(sd for sd in _table(copy, "sample_data")
                 if sd["sample_token"] == victim and "LIDAR_TOP" in sd["filename"])
    _write_table(copy, "ego_pose", [p for p in _table(copy, "ego_pose") if p["token"] != lidar["ego_pose_token"]])
    items = list(NuScenesSource(copy))
    assert len(items) == 42
    failed = items[10]
    assert isinstance(failed, SampleFailure) and failed.kind == "error"
    assert "ego_pose" in failed.reason and lidar["ego_pose_token"] in failed.reason
    # keyframe 10 is in the future of 4..9 and the history of 11..14
    assert [isinstance(i, SampleFailure) for i in items[4:PER_SCENE]] == [True] * 11 + [False] * 6
    assert all(isinstance(i, EvalSample) for i in items[PER_SCENE + 4 :])


def test_keyframe_timing_and_broken_chain(root: Path, tmp_path: Path) -> None:
    copy = _copy(root, tmp_path)
    tokens = [i.sample_id.split("/")[1] for i in list(NuScenesSource(copy))[:PER_SCENE]]
    samples = _table(copy, "sample")
    by_token = {s["token"]: s for s in samples}
    by_token[tokens[10]]["timestamp"] += 300_000  # 0.3 s late: outside the 0.1 s tolerance
    by_token[tokens[18]]["next"] = "f" * 32  # the chain breaks after keyframe 18
    _write_table(copy, "sample", samples)
    items = list(NuScenesSource(copy))
    assert len(items) == len(NuScenesSource(copy)) == 19 + 1 + PER_SCENE
    assert _gt(_ok(items[9])).valid.tolist() == [False, True, True, True, True, True]
    assert _gt(_ok(items[9])).xy[0].tolist() == [0.0, 0.0]
    assert all(isinstance(i, SampleFailure) and i.kind == "skipped" for i in items[10:15])
    assert isinstance(items[15], EvalSample)
    end = items[19]
    assert isinstance(end, SampleFailure) and end.kind == "error" and "f" * 32 in end.reason
    assert end.scene == "scene-0001"


def test_can_bus_missing_or_corrupt(root: Path, tmp_path: Path) -> None:
    copy = _copy(root, tmp_path)
    (copy / "can_bus" / "scene-0002_pose.json").write_text("{not json")
    (copy / "can_bus" / "scene-0001_pose.json").unlink()  # a scene without CAN data, as some real ones
    items = list(NuScenesSource(copy))
    straight, turn = _ok(items[6]), _ok(items[PER_SCENE + 6])
    assert straight.extra["ego_state_from"] == "ego_pose" and "can_bus_note" not in straight.extra
    assert straight.ego.speed_mps == pytest.approx(10.0, abs=1e-4)
    assert straight.ego.accel_mps2 == pytest.approx(0.0, abs=1e-3)
    assert turn.extra["ego_state_from"] == "ego_pose" and "scene-0002_pose.json" in turn.extra["can_bus_note"]
    chord_speed = 2 * RADIUS * np.sin(OMEGA * 0.25) / 0.5
    assert turn.ego.speed_mps == pytest.approx(chord_speed, abs=1e-4)
    shutil.rmtree(copy / "can_bus")
    assert _ok(list(NuScenesSource(copy))[6]).ego.speed_mps == pytest.approx(10.0, abs=1e-4)
