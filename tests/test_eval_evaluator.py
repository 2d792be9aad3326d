"""The replay evaluator end to end: the shipped model over nuScenes, WOD-E2E and rosbag2 recordings
of generated scenes, resume, per-sample failures, the report and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.evaluator import RESULTS_FILE, run_evaluation, to_sample_frame
from blockpilot.eval.records import ResultsFileError, read_results
from blockpilot.eval.types import EvalSample, Trajectory
from blockpilot.runtime.backend import BackendError
from blockpilot.runtime.plan_types import DecoderSettings, Observation
from blockpilot.runtime.planner import Planner
from blockpilot.sim.generator import generate_scene
from blockpilot.vla.prompt import EgoState

SEED = 1_000_123  # a held-out seed (>= HELDOUT_SEED_BASE)


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner.from_checkpoint(SHIPPED_MODEL, decoder=DecoderSettings(name="scaffold"))


@pytest.fixture(scope="module")
def scene() -> Any:
    return generate_scene(SEED, duration_s=8.0)


@pytest.fixture(scope="module")
def nuscenes_root(tmp_path_factory: pytest.TempPathFactory, scene: Any) -> Path:
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    return write_nuscenes([scene], tmp_path_factory.mktemp("nus") / "dataroot")


def _header(name: str) -> dict[str, Any]:
    return {"source": {"name": name}, "checkpoint": str(SHIPPED_MODEL), "decoder": {"name": "scaffold"},
            "schema": {"num_waypoints": 6, "rate_hz": 2.0}}


def test_nuscenes_replay_scores_model_and_baseline(planner: Planner, nuscenes_root: Path, tmp_path: Path) -> None:
    from blockpilot.eval.nuscenes import NuScenesSource
    from blockpilot.eval.report import write_report

    source = NuScenesSource(nuscenes_root)
    run = run_evaluation(planner, source, tmp_path, header=_header("nuscenes"), limit=8, progress=False)
    header, records = read_results(run.results)
    assert header is not None and header["source"] == {"name": "nuscenes"}
    assert [r["status"] for r in records[:4]] == ["skipped"] * 4  # less than 2 s of history
    assert all(r["status"] == "ok" for r in records[4:]), [r.get("error") for r in records]
    first = records[4]
    model, cv = first["metrics"]["model"], first["metrics"]["cv"]
    assert model["times_s"] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0] and all(model["valid"])
    assert model["coll_stp3"] is not None and model["coll_bev"] is not None and model["rfs"] is None
    gt = np.array(first["gt"]["xy"])
    assert np.allclose(cv["l2"], np.linalg.norm(np.array(first["predictions"]["cv"]["xy"]) - gt, axis=1), atol=1e-3)
    assert first["stats"]["forwards"] > 0 and first["stats"]["stage_ms"]["total"] > 0
    report = write_report(run.results, tmp_path / "report")
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["counts"]["skipped"] == 4
    assert (report / "summary.md").read_text().count("UniAD") >= 1


def test_resume_skips_finished_samples_and_cuts_a_torn_line(planner: Planner, nuscenes_root: Path,
                                                              tmp_path: Path) -> None:
    from blockpilot.eval.nuscenes import NuScenesSource

    source = NuScenesSource(nuscenes_root)
    first = run_evaluation(planner, source, tmp_path, header=_header("nuscenes"), limit=6, progress=False)
    assert first.written == 6
    with first.results.open("a") as f:
        f.write('{"sample_id": "torn')  # a crash in the middle of a line
    second = run_evaluation(planner, source, tmp_path, header=_header("nuscenes"), limit=9, progress=False)
    assert (second.resumed, second.written) == (6, 3)
    _, records = read_results(second.results)
    ids = [r["sample_id"] for r in records]
    assert len(ids) == 9 == len(set(ids))
    other = {**_header("nuscenes"), "decoder": {"name": "block"}}
    with pytest.raises(ResultsFileError, match="decoder"):
        run_evaluation(planner, source, tmp_path, header=other, progress=False)
    fresh = run_evaluation(planner, source, tmp_path, header=other, limit=5, overwrite=True, progress=False)
    assert (fresh.resumed, fresh.written) == (0, 5)


class _FlakyPlanner:
    """The real planner, except that it fails on one chosen sample as a broken engine would."""

    def __init__(self, planner: Planner, fail_on_call: int) -> None:
        self.inner, self.fail_on_call, self.calls = planner, fail_on_call, 0
        self.schema, self.settings = planner.schema, planner.settings

    def plan(self, observation: Observation) -> Any:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise BackendError("engine lost its context")
        return self.inner.plan(observation)


def test_bad_samples_are_recorded_and_the_run_goes_on(planner: Planner, scene: Any, tmp_path: Path) -> None:
    from blockpilot.eval.nuscenes import NuScenesSource
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    root = write_nuscenes([scene], tmp_path / "dataroot")
    images = sorted((root / "samples" / "CAM_FRONT").iterdir())
    images[5].unlink()  # the keyframe after the first plannable one
    run = run_evaluation(_FlakyPlanner(planner, fail_on_call=3), NuScenesSource(root), tmp_path / "run",
                         header=_header("nuscenes"), limit=9, progress=False)
    _, records = read_results(run.results)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 2 and run.counts["ok"] == 3
    assert images[5].name in failed[0]["error"]
    assert "engine lost its context" in failed[1]["error"]
    assert "cv" in failed[0]["metrics"]  # the baseline is still scored on a sample the model failed


def test_wod_e2e_replay_scores_rfs(planner: Planner, tmp_path: Path) -> None:
    from blockpilot.eval.wod import WodE2ESource
    from blockpilot.sim.cameras import FRONT_CAMERA
    from blockpilot.sim.writers.wod_e2e import write_wod_e2e

    # CAM_FRONT is written as the WOD FRONT camera, the one the shipped model was trained on.
    path = write_wod_e2e([generate_scene(SEED, duration_s=11.0)], tmp_path / "wod", cameras=[FRONT_CAMERA])
    source = WodE2ESource(path)
    run = run_evaluation(planner, source, tmp_path / "run", header=_header("wod"), progress=False)
    _, records = read_results(run.results)
    assert records and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    for record in records:
        rfs = record["metrics"]["model"]["rfs"]
        assert rfs is not None and 0.0 <= rfs["score"] <= 10.0 and list(rfs["per_horizon"]) == ["3"]
        assert record["metrics"]["cv"]["rfs"] is not None
        assert record["metrics"]["model"]["coll_stp3"] is None  # WOD-E2E has no agent boxes
        assert len(record["raters"]) == 3


def test_rosbag2_replay_runs(planner: Planner, scene: Any, tmp_path: Path) -> None:
    from blockpilot.eval.mcap import Rosbag2Source
    from blockpilot.sim.writers.mcap_writer import write_rosbag2

    bag = write_rosbag2(scene, tmp_path / "bag")
    run = run_evaluation(planner, Rosbag2Source(bag), tmp_path / "run", header=_header("mcap"), progress=False)
    _, records = read_results(run.results)
    ok = [r for r in records if r["status"] == "ok"]
    assert ok, [r.get("error") for r in records]
    assert ok[0]["route_command"] == scene.route_command or ok[0]["route_command"] == "go straight"
    assert ok[0]["metrics"]["model"]["times_s"][0] == 0.5


def _sample(frame: str, mount: tuple[float, float]) -> EvalSample:
    ego = EgoState(np.zeros((4, 2)), 5.0, 0.0)
    future = Trajectory(np.array([0.5]), np.zeros((1, 2)), np.array([True]))
    return EvalSample("s", "nuscenes", "scene", 0, ego, "go straight", lambda: [], future, frame=frame,
                      extra={"lidar_mount_xy": mount})


def test_predictions_move_to_the_lidar_frame_by_the_mount() -> None:
    straight = np.array([[5.0, 0.0], [10.0, 0.0]])
    assert np.allclose(to_sample_frame(_sample("lidar", (1.0, 0.0)), straight), straight)
    assert np.allclose(to_sample_frame(_sample("ego", (1.0, 0.0)), straight), straight)
    # Heading +90 degrees at the first step: the sensor 1 m ahead of the ego origin moves to (0, 1) from it,
    # i.e. (-1, +1) relative to where it was mounted at t0.
    turn = np.array([[0.0, 2.0]])
    assert np.allclose(to_sample_frame(_sample("lidar", (1.0, 0.0)), turn), [[-1.0, 3.0]])


def test_eval_cli_runs_reports_and_compares(nuscenes_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--source", "nuscenes", "--dataroot", str(nuscenes_root), "--checkpoint", str(SHIPPED_MODEL),
            "--limit", "6", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--decoder", "ar"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and (tmp_path / "a" / "report" / "summary.html").is_file()
    assert (tmp_path / "a" / RESULTS_FILE).is_file()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.md").is_file()
    capsys.readouterr()
    assert main(["eval", "--source", "nuscenes", "--dataroot", str(tmp_path / "missing"), "--checkpoint",
                 str(SHIPPED_MODEL), "--out", str(tmp_path / "c")]) == 2
    assert "missing" in capsys.readouterr().err
    # A camera no sample has: every sample fails, the report says why, and the run does not pass as a success.
    assert main([*args, "--out", str(tmp_path / "d"), "--cameras", "CAM_BACK"]) == 1
    err = capsys.readouterr().err
    assert "no sample of 6 could be planned on" in err and "CAM_BACK" in err
    assert "CAM_BACK" in (tmp_path / "d" / "report" / "summary.md").read_text()


@pytest.mark.parametrize(("left", "valid", "command"), [
    (2.0, [True, True], "turn left"), (1.99, [True, True], "go straight"), (-2.0, [True, True], "turn right"),
    (5.0, [True, False], "go straight"),  # the last VALID point decides: here it is the first, 0.5 m left
    (5.0, [False, False], "go straight"),
])
def test_route_command_from_the_logged_future(left: float, valid: list[bool], command: str) -> None:
    from blockpilot.eval.types import route_command_from_future

    assert route_command_from_future([[10.0, 0.5], [20.0, left]], valid) == command
