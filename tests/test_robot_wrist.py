"""The SO-101 wrist camera (blockpilot.sim.robot.so101): it follows the gripper and sees the block at the grasp,
is deterministic, round-trips through a LeRobot dataset beside the front camera, and feeds a 2-camera planner in
closed loop (``blockpilot eval --closed-loop --cameras front,wrist``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.sim.robot.closed_loop import HELD_OUT_START
from blockpilot.sim.robot.lerobot_io import LeRobotReplaySource, write_lerobot_dataset
from blockpilot.sim.robot.so101 import ExpertConfig, run_expert_episode
from blockpilot.sim.robot.types import RobotDataError

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
BOTH = ("front", "wrist")
GRASP_STEPS = 20  # seed 3 of pick_place closes its jaws on the block at step 17


def _block_share(frame: np.ndarray) -> float:
    """The share of the frame's central half (both axes) in the block's colour (rgba .6 .3 .6: red and blue well
    above green; the table, sky and the yellow arm are not)."""
    h, w = frame.shape[:2]
    centre = frame[h // 4: 3 * h // 4, w // 4: 3 * w // 4].astype(int)
    r, g, b = centre[..., 0], centre[..., 1], centre[..., 2]
    return float(((r > 1.4 * g) & (b > 1.4 * g) & (r > 60)).mean())


@pytest.fixture(scope="module")
def to_grasp():
    return run_expert_episode(3, ExpertConfig(task="pick_place", image_size=SIZE, cameras=BOTH,
                                              max_steps=GRASP_STEPS))


def test_wrist_view_follows_the_gripper_and_holds_the_block_at_the_grasp(to_grasp) -> None:
    ep = to_grasp
    assert list(ep.images) == list(BOTH)
    wrist, front = ep.images["wrist"], ep.images["front"]
    assert wrist.shape == front.shape == (ep.length, SIZE, SIZE, 3) and wrist.dtype == np.uint8
    assert not np.array_equal(wrist[0], front[0])  # its own view, not the front camera's
    moved = [float(np.abs(wrist[t].astype(int) - wrist[0].astype(int)).mean()) for t in (5, 10, 15)]
    assert min(moved) > 3.0  # the view moves with the arm
    grasp = int(np.argmax(ep.actions[:, 3] == 0.0))  # the first step the expert closes the jaws
    assert ep.actions[grasp, 3] == 0.0 and grasp > 5
    assert _block_share(wrist[0]) < 0.01  # at the start the gripper points away from the block
    assert _block_share(wrist[grasp]) > 0.4  # between the jaws, at the centre of the wrist view
    assert _block_share(front[grasp]) < 0.1  # small in the front view: the wrist view adds detail


def test_the_same_seed_renders_the_same_wrist_frames(to_grasp) -> None:
    again = run_expert_episode(3, ExpertConfig(task="pick_place", image_size=SIZE, cameras=("wrist",), max_steps=6))
    assert list(again.images) == ["wrist"]
    np.testing.assert_array_equal(again.images["wrist"], to_grasp.images["wrist"][:6])
    other = run_expert_episode(4, ExpertConfig(task="pick_place", image_size=SIZE, cameras=("wrist",), max_steps=6))
    assert not np.array_equal(other.images["wrist"][-1], again.images["wrist"][-1])  # another block position


def test_both_cameras_round_trip_through_a_lerobot_dataset(tmp_path: Path, to_grasp) -> None:
    episode = run_expert_episode(5, ExpertConfig(task="pick_place", image_size=32, cameras=BOTH, max_steps=4))
    root = write_lerobot_dataset([episode], tmp_path / "ds")
    features = json.loads((root / "meta" / "info.json").read_text())["features"]
    assert features["observation.images.wrist"]["shape"] == [32, 32, 3]
    source = LeRobotReplaySource(root, chunk=2)
    assert source.cameras == BOTH and len(source) == 4
    for t in range(4):
        sample = source[t]
        assert list(sample.images) == list(BOTH)
        for name in BOTH:
            np.testing.assert_array_equal(sample.images[name], episode.images[name][t])  # PNG: lossless
    wrist_only = LeRobotReplaySource(root, chunk=2, cameras=["wrist"])
    assert wrist_only.cameras == ("wrist",) and list(wrist_only[0].images) == ["wrist"]
    with pytest.raises(RobotDataError, match=r"observation\.images\.wrist"):
        LeRobotReplaySource(root, cameras=["front", "side"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.vla.reference_model import write_reference_checkpoint

    return write_reference_checkpoint(tmp_path_factory.mktemp("wrist") / "ckpt")


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        rc = main(["eval", "--closed-loop", "--no-progress", "--task", "reach_close", "--image-size", "32", *argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def test_a_two_camera_planner_runs_a_closed_loop_episode_on_both_images(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.runtime.planner import Planner

    seen: list[list[tuple[int, ...]]] = []
    plan_robot = Planner.plan_robot

    def spy(self: Planner, observation: Any) -> Any:
        seen.append([im.shape for im in observation.images])
        return plan_robot(self, observation)

    monkeypatch.setattr(Planner, "plan_robot", spy)
    out = tmp_path / "run"
    rc, err = _eval(capsys, "--checkpoint", str(checkpoint), "--schema", "so101-ee", "--cameras", "front,wrist",
                    "--seeds", f"{HELD_OUT_START}:{HELD_OUT_START + 1}", "--max-steps", "2", "--baselines", "none",
                    "--threads", "1", "--out", str(out))
    assert rc == 0, err
    header, record = (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())
    assert header["header"]["cameras"] == ["front", "wrist"]
    assert record["status"] == "ok" and record["steps"] == 2, record
    assert seen and all(shapes == [(32, 32, 3), (32, 32, 3)] for shapes in seen)


@pytest.mark.parametrize("cameras", ["front,side", "wrist,wrist", ","])
def test_bad_cameras_exit_2_naming_the_flag(cameras: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _eval(capsys, "--cameras", cameras, "--baselines", "hold", "--out", str(tmp_path / "run"))
    assert rc == 2 and "--cameras" in err, err
    assert not (tmp_path / "run").exists()
