"""Closed-loop robot evaluation: the SO-101 simulator driven by a policy (``blockpilot.sim.robot.closed_loop``) and
``blockpilot eval --closed-loop`` over a checkpoint or a bundle, its resume, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.eval.robot_closed_loop import (
    ClosedLoopUsageError,
    PlanAnswerError,
    PlannerPolicy,
    run_closed_loop,
    wilson_interval,
)
from blockpilot.runtime.backend import BackendError
from blockpilot.runtime.plan_types import ObservationError
from blockpilot.sim.robot.closed_loop import (
    HELD_OUT_START,
    ExpertPolicy,
    HoldPolicy,
    SimObservation,
    run_closed_loop_episode,
)
from blockpilot.sim.robot.so101 import ExpertConfig, run_expert_episode
from blockpilot.vla.plans import ActionChunkSchema

pytestmark = pytest.mark.usefixtures("one_thread")
REACH = ExpertConfig(task="reach_close", image_size=16)
SEED = HELD_OUT_START


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["eval", "--closed-loop", "--no-progress", "--task", "reach_close", "--image-size", "32", *argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "plan_ms"} == {k: v for k, v in b.items() if k != "plan_ms"}


@pytest.mark.parametrize(("task", "seeds"), [("reach_close", (0,)), ("pick_place", (0,))])
def test_the_expert_through_the_closed_loop_takes_the_recorded_actions_and_succeeds(task: str,
                                                                                     seeds: tuple[int, ...]) -> None:
    config = ExpertConfig(task=task, image_size=16)
    for seed in seeds:
        recorded = run_expert_episode(seed, config)
        episode = run_closed_loop_episode(seed, ExpertPolicy(), config)
        assert recorded.succeeded and episode.success and episode.error is None
        assert episode.actions is not None
        np.testing.assert_array_equal(episode.actions, recorded.actions)
        assert episode.steps == recorded.length and episode.time_to_success_s == pytest.approx(episode.steps / 10)
        assert episode.collisions == 0 and episode.clipped_actions == 0
        assert len(episode.plan_ms) == episode.steps  # the expert answers one row per call


def test_hold_fails_and_one_seed_gives_one_record() -> None:
    config = ExpertConfig(task="reach_close", image_size=16, max_steps=10)
    first = run_closed_loop_episode(SEED, HoldPolicy(), config, keep_frames=True)
    again = run_closed_loop_episode(SEED, HoldPolicy(), config, keep_frames=True)
    assert not first.success and first.steps == 10 and first.error is None
    assert first.final_distance_m > 0.05  # the block was never reached
    assert _same(first.to_record(), again.to_record())
    assert first.frames is not None and first.frames.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(first.frames, again.frames)
    expert = [run_closed_loop_episode(SEED, ExpertPolicy(), REACH).to_record() for _ in range(2)]
    assert _same(*expert) and expert[0]["success"]
    other = run_closed_loop_episode(SEED + 1, HoldPolicy(), config).to_record()
    assert other["final_distance_m"] != first.final_distance_m  # the seed moves the block


class _Stub:
    """A planner answering fixed chunks; the calls (counted from 0) listed in ``bad`` fail as told."""

    def __init__(self, bad: dict[int, str], schema: ActionChunkSchema | None = None) -> None:
        self.schema = schema or ActionChunkSchema.so101_ee()
        self.bad = bad
        self.calls: list[SimObservation] = []

    def plan_robot(self, observation: Any) -> Any:
        how = self.bad.get(len(self.calls))
        self.calls.append(observation)
        if how == "refused":
            raise ObservationError("observation.state: refused")
        chunk = SimpleNamespace(actions=np.tile([[0.5, 0.0, -0.2, 1.0]], (8, 1)))
        return SimpleNamespace(plan=None if how == "unparsed" else chunk, error="bad number at 3",
                               stats=SimpleNamespace(stage_ms={"total": 2.5}, forwards=7))


def test_a_planner_that_fails_on_an_episode_fails_that_episode_only(tmp_path: Path) -> None:
    stub = _Stub({0: "unparsed", 4: "refused"})  # episode 0: call 0; episode 1: calls 1-3; episode 2: call 4
    policy = PlannerPolicy(stub, execute=3)
    config = ExpertConfig(task="reach_close", image_size=16, max_steps=7)
    header = {"kind": "closed_loop", "task": "reach_close", "seeds": [SEED, SEED + 3], "held_out_start": SEED,
              "execute": 3, "max_steps": 7, "model": "stub"}
    summary = run_closed_loop([policy], range(SEED, SEED + 3), config, tmp_path, header=header,
                              errors=(BackendError, PlanAnswerError))
    records = {r["sample_id"]: r for r in _lines(tmp_path)[1:]}
    assert list(records) == [f"model/{s}" for s in range(SEED, SEED + 3)]
    assert records[f"model/{SEED}"]["status"] == "failed" and "did not parse" in records[f"model/{SEED}"]["error"]
    assert "ObservationError" in records[f"model/{SEED + 2}"]["error"]
    ok = records[f"model/{SEED + 1}"]
    assert ok["status"] == "ok" and ok["steps"] == 7 and ok["plan_ms"] == [2.5] * 3 and ok["forwards"] == [7] * 3
    assert ok["clipped_actions"] == 0
    observation = stub.calls[1]
    assert observation.instruction == config.spec.instruction and len(observation.state) == 6
    assert [im.shape for im in observation.images] == [(16, 16, 3)]
    model = summary["policies"]["model"]
    assert model["errors"] == 2 and model["episodes"] == 3 and model["plan_ms"]["plans"] == 3
    assert (tmp_path / "report.html").is_file() and "Errored episodes" in (tmp_path / "report.html").read_text()
    with pytest.raises(ClosedLoopUsageError, match="--schema"):
        PlannerPolicy(_Stub({}, ActionChunkSchema.so101_joints()))
    with pytest.raises(ClosedLoopUsageError, match="--execute"):
        PlannerPolicy(_Stub({}), execute=9)


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = wilson_interval(8, 10)  # type: ignore[misc]
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(0, 0) is None  # type: ignore[index]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockpilot.export.bundle_export import export_bundle
    from blockpilot.vla.reference_model import write_reference_checkpoint

    root = tmp_path_factory.mktemp("closed_loop")
    ckpt = write_reference_checkpoint(root / "ckpt")
    return {"ckpt": ckpt, "bundle": export_bundle(ckpt, root / "bundle", schema="so101-ee").bundle}


@pytest.mark.parametrize("kind", ["checkpoint", "bundle"])
def test_cli_runs_a_planner_end_to_end_and_writes_the_report(models: dict[str, Path], kind: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    source = ["--checkpoint", str(models["ckpt"]), "--schema", "so101-ee"] if kind == "checkpoint" else \
        ["--bundle", str(models["bundle"])]
    rc, text, err = _cli(capsys, *source, "--seeds", f"{SEED}:{SEED + 1}", "--max-steps", "2", "--baselines",
                         "hold", "--threads", "1", "--out", str(out))
    assert rc == 0, err
    header, *records = _lines(out)
    assert header["header"]["schema"]["dims"] == ["dx", "dy", "dz", "gripper"]
    assert [r["sample_id"] for r in records] == [f"model/{SEED}", f"hold/{SEED}"]
    model = records[0]
    assert model["status"] == "ok" and model["steps"] == 2 and len(model["plan_ms"]) == 1
    assert model["forwards"][0] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"model", "hold"} and summary["worst"] == {"policy": "model", "seed": SEED}
    assert summary["policies"]["model"]["plan_ms"]["p50"] == pytest.approx(model["plan_ms"][0])
    html = (out / "report.html").read_text()
    for png in ("success.png", "episode_length.png", "worst_episode.png"):
        assert f"plots/{png}" in html and (out / "plots" / png).stat().st_size > 0
    assert "model" in text and "hold" in text


def test_cli_resumes_a_killed_run_without_losing_or_repeating_an_episode(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ("--seeds", f"{SEED}:{SEED + 2}", "--max-steps", "3", "--baselines", "hold", "--out", str(out))
    assert _cli(capsys, *argv)[0] == 0
    full = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(full) == 3
    (out / "results.jsonl").write_text("".join(full[:2]) + full[2][:25])  # killed while writing the second episode
    rc, _, err = _cli(capsys, *argv)
    assert rc == 0, err
    again = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert again[:2] == full[:2]
    assert [json.loads(line)["sample_id"] for line in again[1:]] == [f"hold/{s}" for s in range(SEED, SEED + 2)]
    assert all(_same(json.loads(a), json.loads(b)) for a, b in zip(again[1:], full[1:], strict=True))
    assert json.loads((out / "summary.json").read_text())["policies"]["hold"]["episodes"] == 2
    rc, _, err = _cli(capsys, *argv[:2], "--max-steps", "4", *argv[4:])
    assert rc == 2 and "results.jsonl" in err and "max_steps" in err and "--overwrite" in err


@pytest.mark.parametrize(("argv", "flag"), [
    (("--task", "stack_cubes", "--baselines", "hold"), "--task"),
    (("--seeds", "5:3", "--baselines", "hold"), "--seeds"),
    (("--seeds", "a:b", "--baselines", "hold"), "--seeds"),
    (("--baselines", "expert,dance"), "--baselines"),
    (("--baselines", "none"), "--checkpoint"),
    (("--source", "lerobot", "--dataroot", ".", "--baselines", "hold"), "--source"),
    (("--baselines", "hold", "--execute", "2"), "--execute"),
])
def test_bad_invocations_exit_2_naming_the_flag(argv: tuple[str, ...], flag: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert rc == 2 and flag in err, err
    assert not (tmp_path / "run").exists()


def test_a_schema_that_does_not_fit_the_simulator_is_refused_naming_schema(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(capsys, "--checkpoint", str(models["ckpt"]), "--schema", "so101-joints", "--out",
                      str(tmp_path / "run"))
    assert rc == 2 and "--schema" in err and "so101-ee" in err
    assert not (tmp_path / "run").exists()
    rc, _, err = _cli(capsys, "--checkpoint", str(models["ckpt"]), "--schema", "so101-ee", "--execute", "9",
                      "--out", str(tmp_path / "run"))
    assert rc == 2 and "--execute 9" in err
