"""LeRobot datasets (v3.0 layout), written and read through LeRobot's own ``LeRobotDataset``
(blockpilot.sim.robot.lerobot_io): episode boundaries, task strings, images and action chunks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from blockpilot.sim.robot.lerobot_io import LeRobotReplaySource, write_lerobot_dataset
from blockpilot.sim.robot.lerobot_lib import lerobot_dataset_class
from blockpilot.sim.robot.so101 import ExpertConfig, run_expert_episode
from blockpilot.sim.robot.types import RobotDataError

CHUNK = 4


def _lerobot_written(root, lengths, tasks):
    """A dataset made by LeRobot's writer directly: frame t of episode e has action (100 e + t) and a uniform image."""
    dataset = lerobot_dataset_class().create(
        "test/synthetic", fps=10, root=root, use_videos=False, features={
            "observation.images.top": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channel"]},
            "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
            "action": {"dtype": "float32", "shape": (3,), "names": None}})
    for episode, (length, task) in enumerate(zip(lengths, tasks, strict=True)):
        for t in range(length):
            dataset.add_frame({"observation.images.top": np.full((16, 16, 3), 10 * t + episode, np.uint8),
                               "observation.state": np.asarray([episode, t], np.float32),
                               "action": np.full(3, 100 * episode + t, np.float32), "task": task})
        dataset.save_episode()
    dataset.finalize()
    return root


def test_a_dataset_written_by_lerobot_replays_with_boundaries_tasks_and_padded_chunks(tmp_path):
    lengths, tasks = (5, 3), ("pick up the cube", "place the cube on the goal")
    source = LeRobotReplaySource(_lerobot_written(tmp_path / "ds", lengths, tasks), chunk=CHUNK)
    assert json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())["codebase_version"] == "v3.0"
    assert len(source) == sum(lengths) and source.num_episodes == 2 and source.cameras == ("top",)
    samples = list(source)
    expected = [(0, t) for t in range(5)] + [(1, t) for t in range(3)]
    assert [(s.episode_index, s.frame_index) for s in samples] == expected
    for s in samples:
        e, t, length = s.episode_index, s.frame_index, lengths[s.episode_index]
        assert s.instruction == tasks[e]
        np.testing.assert_array_equal(s.state, [e, t])
        assert s.images["top"].dtype == np.uint8 and s.images["top"].shape == (16, 16, 3)
        assert (s.images["top"] == 10 * t + e).all()
        # the next CHUNK actions of this episode; past its end, its last action repeated and flagged as padding
        steps = np.minimum(np.arange(t, t + CHUNK), length - 1)
        np.testing.assert_array_equal(s.actions, np.repeat((100 * e + steps)[:, None], 3, axis=1))
        np.testing.assert_array_equal(s.action_pad, np.arange(t, t + CHUNK) >= length)
        assert s.ee_pose is None


def test_episode_selection_reads_only_those_episodes(tmp_path):
    source = LeRobotReplaySource(_lerobot_written(tmp_path / "ds", (2, 3, 2), ("a", "b", "c")), chunk=2,
                                 episodes=[1])
    assert len(source) == 3 and {s.instruction for s in source} == {"b"}


@pytest.fixture(scope="module")
def expert_episodes():
    return [run_expert_episode(seed, ExpertConfig(task="reach_close", image_size=32)) for seed in (11, 12)]


def test_expert_demonstrations_round_trip_through_a_lerobot_dataset(tmp_path, expert_episodes):
    root = write_lerobot_dataset(expert_episodes, tmp_path / "so101")
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 2 and info["fps"] == 10
    assert info["total_frames"] == sum(ep.length for ep in expert_episodes)
    assert info["features"]["action"]["names"] == ["dx", "dy", "dz", "grasp"]
    assert (root / "meta" / "tasks.parquet").is_file() and list((root / "data").rglob("*.parquet"))
    sidecar = json.loads((root / "meta" / "blockpilot_episodes.json").read_text())
    assert [(row["seed"], row["success"]) for row in sidecar] == [(11, True), (12, True)]
    source = LeRobotReplaySource(root, chunk=CHUNK)
    index = 0
    for episode_index, ep in enumerate(expert_episodes):
        for t in range(ep.length):
            s = source[index]
            index += 1
            assert (s.episode_index, s.frame_index, s.instruction) == (episode_index, t, ep.instruction)
            np.testing.assert_array_equal(s.images["front"], ep.images["front"][t])  # PNG: lossless
            np.testing.assert_array_equal(s.state, ep.joint_state[t])
            np.testing.assert_array_equal(s.ee_pose, ep.ee_pose[t])
            steps = np.minimum(np.arange(t, t + CHUNK), ep.length - 1)
            np.testing.assert_array_equal(s.actions, ep.actions[steps])
    assert index == len(source)


def test_writer_refuses_an_existing_destination_and_leaves_it_alone(tmp_path, expert_episodes):
    dest = tmp_path / "so101"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(RobotDataError, match="exists"):
        write_lerobot_dataset(expert_episodes[:1], dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    write_lerobot_dataset(expert_episodes[:1], dest, overwrite=True)
    assert (dest / "meta" / "info.json").is_file() and not (dest / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["so101"]  # no staging directory left beside it


def test_writer_refuses_no_episode_and_mixed_layouts(tmp_path, expert_episodes):
    with pytest.raises(RobotDataError, match="no episode"):
        write_lerobot_dataset([], tmp_path / "a")
    small = run_expert_episode(11, ExpertConfig(task="reach_close", image_size=16, max_steps=2))
    with pytest.raises(RobotDataError, match="seed 11"):
        write_lerobot_dataset([expert_episodes[0], small], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_source_refuses_what_is_not_a_lerobot_dataset(tmp_path):
    with pytest.raises(RobotDataError, match=r"info\.json is missing"):
        LeRobotReplaySource(tmp_path)
    root = _lerobot_written(tmp_path / "ds", (2,), ("a",))
    with pytest.raises(RobotDataError, match="chunk"):
        LeRobotReplaySource(root, chunk=0)
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    del info["features"]["action"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(RobotDataError, match="'action' is missing"):
        LeRobotReplaySource(root)
    shutil.rmtree(root / "meta")
    info_path.parent.mkdir()
    info_path.write_text("{not json")
    with pytest.raises(RobotDataError, match=r"info\.json cannot be read"):
        LeRobotReplaySource(root)
