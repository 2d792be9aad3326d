"""``blockpilot eval --source lerobot``: a LeRobot dataset replayed through a manipulation planner, scored against
the repeat-last-action baseline (checked here against a hand computation), and refused when its dims disagree."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.sim.robot.lerobot_io import write_lerobot_dataset
from blockpilot.sim.robot.types import RobotEpisode
from blockpilot.vla.plans import SO101_JOINTS

LENGTHS = (5, 3)
STEPS = 8  # so101-joints


def _episode(seed: int, length: int, action_names: tuple[str, ...]) -> RobotEpisode:
    rng = np.random.default_rng(seed)
    actions = np.round(rng.uniform(-1, 1, (length, len(action_names))), 2).astype(np.float32)
    return RobotEpisode(
        seed=seed, task="synthetic", instruction="pick up the cube", fps=10,
        images={"front": rng.integers(0, 255, (length, 64, 64, 3), dtype=np.uint8)}, joint_names=SO101_JOINTS,
        joint_state=rng.uniform(-1, 1, (length, 6)).astype(np.float32), ee_pose=np.zeros((length, 7), np.float32),
        environment_state=np.zeros((length, 3), np.float32), action_names=action_names, actions=actions,
        success=np.zeros(length, bool))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from blockpilot.vla.reference_model import write_reference_checkpoint

    root = tmp_path_factory.mktemp("robot_eval")
    episodes = [_episode(s, n, SO101_JOINTS) for s, n in enumerate(LENGTHS)]
    bad = [_episode(9, 3, ("dx", "dy", "dz", "grasp"))]
    return {"ckpt": write_reference_checkpoint(root / "ckpt"), "root": root, "episodes": episodes,
            "good": write_lerobot_dataset(episodes, root / "good"), "bad": write_lerobot_dataset(bad, root / "bad")}


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["eval", "--source", "lerobot", "--no-progress", *argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _hand_baseline(episodes: list[RobotEpisode]) -> dict[str, object]:
    """Repeat-last-action by hand: each frame after the first repeats the previous action over the next 8 steps."""
    all_actions = np.concatenate([ep.actions for ep in episodes]).astype(np.float64)
    threshold = (all_actions[:, 5].min() + all_actions[:, 5].max()) / 2
    abs_sum, sq_sum, per_step_abs = np.zeros(6), np.zeros(6), [[] for _ in range(STEPS)]
    rows, grip_hits = 0, 0
    for ep in episodes:
        acts = ep.actions.astype(np.float64)
        for t in range(1, ep.length):
            for k in range(STEPS):
                if t + k >= ep.length:
                    break  # padded row
                err = acts[t - 1] - acts[t + k]
                abs_sum += np.abs(err)
                sq_sum += err ** 2
                per_step_abs[k].extend(np.abs(err))
                rows += 1
                grip_hits += (acts[t - 1, 5] > threshold) == (acts[t + k, 5] > threshold)
    return {"rows": rows, "l1_dim": abs_sum / rows, "mse_dim": sq_sum / rows, "l1": abs_sum.sum() / (6 * rows),
            "mse": sq_sum.sum() / (6 * rows), "grip": grip_hits / rows, "threshold": threshold,
            "l1_step": [np.mean(v) if v else None for v in per_step_abs]}


def test_lerobot_replay_scores_model_and_repeat_last_action(data: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc, stdout, err = _eval(capsys, "--checkpoint", str(data["ckpt"]), "--dataroot", str(data["good"]),
                            "--schema", "so101-joints", "--out", str(out))
    assert rc == 0, err
    assert "repeat-last-action" in stdout and "paired" in stdout
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    counts = metrics["counts"]
    assert counts["total"] == sum(LENGTHS) and counts["failed"] == 0
    assert counts["ok"] + counts["parse_error"] == sum(LENGTHS)
    assert counts["baseline_skipped_first_frames"] == len(LENGTHS)
    assert metrics["latency_ms"]["samples"] == sum(LENGTHS) and metrics["latency_ms"]["p50"] > 0
    hand = _hand_baseline(data["episodes"])
    base = metrics["baseline"]
    assert base["samples"] == sum(LENGTHS) - len(LENGTHS) and base["rows"] == hand["rows"]
    assert metrics["gripper_threshold"] == pytest.approx(hand["threshold"], abs=1e-6)
    assert base["l1"]["mean"] == pytest.approx(hand["l1"], abs=1e-5)
    assert base["mse"]["mean"] == pytest.approx(hand["mse"], abs=1e-5)
    assert [base["l1"]["per_dim"][d] for d in SO101_JOINTS] == pytest.approx(hand["l1_dim"], abs=1e-5)
    assert [base["mse"]["per_dim"][d] for d in SO101_JOINTS] == pytest.approx(hand["mse_dim"], abs=1e-5)
    steps = [base["l1"]["per_step"][str(k)] for k in range(STEPS)]
    assert steps[:4] == pytest.approx(hand["l1_step"][:4], abs=1e-5) and steps[4:] == [None] * 4
    assert base["gripper_accuracy"] == pytest.approx(hand["grip"], abs=1e-6)
    paired = metrics["paired"]
    assert paired["samples"] == sum(1 for r in _records(out) if r["pred"] and r["baseline"])
    assert paired["baseline_l1"] == pytest.approx(hand["l1"], abs=1e-5) or paired["samples"] < base["samples"]
    model = metrics["model"]
    assert model["samples"] == counts["ok"]
    if counts["ok"]:
        assert set(model["l1"]["per_dim"]) == set(SO101_JOINTS) and 0 <= model["gripper_accuracy"] <= 1
    records = _records(out)
    assert len(records) == sum(LENGTHS) and all(len(r["target"]) == STEPS for r in records)
    summary = (out / "report" / "summary.md").read_text()
    assert "repeat-last-action" in summary and "shoulder_pan" in summary and "plots/l1_per_step.png" in summary
    plots = ("latency.png", "l1_per_step.png", "l1_per_dim.png")
    assert all((out / "report" / "plots" / f).stat().st_size > 0 for f in plots)


def test_dataset_dims_that_disagree_with_the_schema_exit_2_naming_the_feature(
        data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, err = _eval(capsys, "--checkpoint", str(data["ckpt"]), "--dataroot", str(data["bad"]),
                            "--schema", "so101-joints", "--out", str(tmp_path / "bad_run"))
    assert rc == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "'action'" in err and "shoulder_pan" in err
    assert not (tmp_path / "bad_run" / "results.jsonl").exists()


class _StubPlanner:
    """Answers a constant chunk; refuses the 3rd observation and fails to parse the 4th."""

    def __init__(self) -> None:
        from blockpilot.vla.plans import ActionChunkSchema

        self.schema, self.calls = ActionChunkSchema.so101_joints(), 0

    def plan_robot(self, observation: object) -> SimpleNamespace:
        from blockpilot.runtime.plan_types import ObservationError

        self.calls += 1
        assert np.asarray(observation.state).shape == (6,) and len(observation.images) == 1  # type: ignore[attr-defined]
        if self.calls == 3:
            raise ObservationError("observation.images: broken frame")
        stats = SimpleNamespace(stage_ms={"total": float(self.calls)})
        if self.calls == 4:
            return SimpleNamespace(plan=None, error="no closing bracket", stats=stats)
        return SimpleNamespace(plan=SimpleNamespace(actions=np.full((STEPS, 6), 0.25)), error=None, stats=stats)


def test_a_bad_sample_is_counted_with_its_reason_and_the_model_is_scored_exactly(data: dict) -> None:
    from blockpilot.eval.robot_eval import open_robot_source, replay_robot
    from blockpilot.eval.robot_metrics import robot_metrics

    records, facts = replay_robot(_StubPlanner(), open_robot_source(data["good"], chunk=STEPS))
    metrics = robot_metrics(records, facts)
    counts = metrics["counts"]
    assert (counts["ok"], counts["parse_error"], counts["failed"]) == (6, 1, 1)
    assert counts["parse_rate"] == pytest.approx(6 / 7)
    assert [(f["index"], f["status"]) for f in counts["failures"]] == [(2, "failed"), (3, "parse_error")]
    assert "broken frame" in counts["failures"][0]["error"]
    assert metrics["latency_ms"]["samples"] == 7 and metrics["latency_ms"]["p50"] == pytest.approx(5.0)
    # by hand: the constant 0.25 chunk against every non-padded target row of the frames that parsed
    errors = [0.25 - ep.actions[t + k].astype(np.float64)
              for e, ep in enumerate(data["episodes"]) for t in range(ep.length)
              if sum(LENGTHS[:e]) + t not in (2, 3) for k in range(STEPS) if t + k < ep.length]
    assert metrics["model"]["rows"] == len(errors)
    assert metrics["model"]["l1"]["mean"] == pytest.approx(np.abs(errors).mean(), abs=1e-5)
    assert metrics["model"]["mse"]["per_dim"]["gripper"] == pytest.approx(np.square(errors)[:, 5].mean(), abs=1e-5)
