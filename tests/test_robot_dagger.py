"""DAgger for the SO-101 model: a policy drives the real simulator, the expert labels every visited state, and
``train-robot --init --dagger`` goes on training from a checkpoint on those rollouts."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.sim.robot.closed_loop import ExpertPolicy, run_closed_loop_episode
from blockpilot.sim.robot.so101 import ExpertConfig, SimSession
from blockpilot.train.robot_dagger import InitCheckpointError, load_init, policy_rollouts
from blockpilot.train.robot_data import RolloutConfig
from blockpilot.vla.plans import ActionChunkSchema
from blockpilot.vla.reference_tokenizer import build_reference_tokenizer
from tests.test_train_robot import fake_rollouts, tiny_config

UP = np.array([0.0, 0.0, 1.0, 1.0])  # straight up, gripper open: never what the expert does from the start pose


class Climb:
    """A policy that always answers three rows of straight up."""

    name = "climb"
    needs_images = False

    def __init__(self) -> None:
        self.asked = 0

    def reset(self, seed: int) -> None:
        self.asked = 0

    def act(self, observation: Any) -> np.ndarray:
        self.asked += 1
        return np.repeat(UP[None, :], 3, axis=0)


def test_dagger_rollouts_go_where_the_policy_drives_and_carry_the_experts_labels() -> None:
    policy = Climb()
    config = RolloutConfig(task="reach_close", image_size=32)
    rollouts = list(policy_rollouts(policy, max_steps=5)([7, 8], config, True))
    assert [r.seed for r in rollouts] == [7, 8] and policy.asked == 2  # 5 steps: two plans of 3 rows each episode
    for rollout in rollouts:
        assert rollout.images.shape == (5, 32, 32, 3) and rollout.joints.shape == (5, 6)
        assert not rollout.succeeded and not rollout.noisy
        # Replayed by hand: the states are the policy's (straight up), the labels the expert's at those states.
        with SimSession(ExpertConfig(task="reach_close", image_size=32), rollout.seed) as sim:
            for t in range(5):
                np.testing.assert_allclose(rollout.joints[t], sim.joint_state())
                np.testing.assert_allclose(rollout.ee_pose[t], sim.ee_pose())
                np.testing.assert_allclose(rollout.actions[t], sim.expert_action())
                sim.step(UP.astype(np.float32))
        assert not np.allclose(rollout.actions, UP)  # the labels are not what ran
        assert rollout.ee_pose[-1, 2] > rollout.ee_pose[0, 2]  # it climbed


def test_a_reused_session_runs_each_episode_as_a_fresh_one() -> None:
    config = ExpertConfig(task="reach_close", image_size=32)
    fresh = [run_closed_loop_episode(seed, ExpertPolicy(), config) for seed in (3, 4)]
    with SimSession(config, 99) as sim:
        run_closed_loop_episode(5, Climb(), ExpertConfig(task="reach_close", image_size=32, max_steps=5), sim=sim)
        reused = [run_closed_loop_episode(seed, ExpertPolicy(), config, sim=sim) for seed in (3, 4)]
        with pytest.raises(ValueError, match="simulator session runs"):
            run_closed_loop_episode(3, ExpertPolicy(), ExpertConfig(task="reach_close", image_size=48), sim=sim)
    for a, b in zip(fresh, reused, strict=True):
        assert (a.seed, a.success, a.steps) == (b.seed, b.success, b.steps)
        np.testing.assert_array_equal(a.actions, b.actions)


@pytest.fixture
def stage_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny robot checkpoint trained on stand-in rollouts (the first stage)."""
    import blockpilot.train.robot_data as robot_data
    import blockpilot.train.robot_trainer as robot_trainer

    monkeypatch.setattr(robot_trainer, "reference_config", tiny_config)
    monkeypatch.setattr(robot_data, "expert_rollouts", fake_rollouts)
    # The stand-in rollouts' frames are 56x56: the simulator's DAgger rollouts are rendered at the same size.
    monkeypatch.setattr(robot_trainer, "RolloutConfig", functools.partial(RolloutConfig, image_size=56))
    out = tmp_path / "stage1"
    assert main(["train-robot", "--out", str(out), "--steps", "2", "--batch", "2", "--train-seeds", "0:2",
                 "--eval-seeds", "100:101", "--eval-every", "2", "--cache-dir", "", "--threads", "1"]) == 0
    return out


def test_train_robot_goes_on_from_a_checkpoint_on_its_own_rollouts(stage_one: Path, tmp_path: Path) -> None:
    out = tmp_path / "stage2"
    code = main(["train-robot", "--out", str(out), "--steps", "2", "--batch", "2", "--train-seeds", "0:2",
                 "--eval-seeds", "100:101", "--eval-every", "2", "--cache-dir", "", "--threads", "1",
                 "--init", str(stage_one), "--dagger", str(stage_one), "--dagger-seeds", "5:7",
                 "--dagger-execute", "2", "--dagger-max-steps", "3"])
    assert code == 0
    log = json.loads((out / "train_log.json").read_text())
    dagger = log["dagger"]
    assert dagger["seeds"] == "5:7" and dagger["execute"] == 2 and dagger["max_steps"] == 3
    assert dagger["stats"]["episodes"] == 2 and 2 <= dagger["stats"]["examples"] <= 6  # at most 3 steps each
    assert log["train_stats"]["examples"] == 5  # the expert part alone, as without DAgger
    assert log["metrics"]["train_examples"] == 5 + dagger["stats"]["examples"]
    assert log["init"]["checkpoint"] == "stage1" and len(log["init"]["sha256"]) == 64
    card = (out / "DATA_CARD.md").read_text()
    assert "DAgger (Ross et al. 2011): the model `stage1`" in card
    reproduce = card.split("## Reproduce")[1]
    first, second = [line for line in reproduce.splitlines() if line.startswith("blockpilot train-robot")]
    assert "--out stage1" in first and "--init" not in first  # the first stage, from its own log
    assert "--out stage2" in second and "--init stage1 --dagger stage1 --dagger-seeds 5:7" in second


def test_dagger_and_init_arguments_are_checked_before_any_work(stage_one: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train-robot", "--out", str(tmp_path / "x"), "--train-seeds", "0:2", "--eval-seeds", "100:101"]
    cases = [
        (["--dagger-seeds", "5:7"], "--dagger-seeds: give --dagger"),
        (["--dagger", str(stage_one)], "--dagger: give --dagger-seeds"),
        (["--dagger", str(stage_one), "--dagger-seeds", "99:102"], "overlaps --eval-seeds"),
        (["--dagger", str(stage_one), "--dagger-seeds", "5:7", "--dagger-execute", "0"], "--dagger-execute 0"),
        (["--init", str(tmp_path)], "not a checkpoint directory"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_refuses_a_checkpoint_of_another_schema(stage_one: Path) -> None:
    tokenizer, _ = build_reference_tokenizer()
    assert load_init(stage_one, tokenizer, ActionChunkSchema.so101_ee_block()).config.vision is not None
    with pytest.raises(InitCheckpointError, match="not this run's"):
        load_init(stage_one, tokenizer, ActionChunkSchema.so101_ee())
    (stage_one / "tokenizer.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(InitCheckpointError, match="not the reference tokenizer"):
        load_init(stage_one, tokenizer, ActionChunkSchema.so101_ee_block())
