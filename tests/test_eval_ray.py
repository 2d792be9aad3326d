"""``blockpilot eval ... --ray``: replay samples and closed-loop episodes sharded over Ray workers give the records
and metrics of a single-process run, in its order; a killed worker loses and repeats nothing; a killed driver resumes;
without Ray, ``--ray`` says how to install it. One local Ray cluster of 2 CPUs serves the whole module."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from blockpilot.cli import main
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE
from blockpilot.vla.reference_model import SHIPPED_MODEL

LIMIT = 12  # the first scene's keyframes: 4 skipped (too little history), 8 planned
SEED = HELDOUT_SEED_BASE


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.sim.generator import generate_scene
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    root = tmp_path_factory.mktemp("ray") / "heldout-nuscenes"
    write_nuscenes([generate_scene(HELDOUT_SEED_BASE)], root)
    return root


def _eval(*argv: str) -> int:
    try:
        return main(["eval", "--no-progress", "--threads", "1", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)


def _replay_argv(dataroot: Path, out: Path) -> tuple[str, ...]:
    return ("--source", "nuscenes", "--dataroot", str(dataroot), "--checkpoint", str(SHIPPED_MODEL),
            "--limit", str(LIMIT), "--out", str(out))


def _untimed(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    if out.get("stats"):
        out["stats"] = {k: v for k, v in out["stats"].items() if k != "stage_ms"}
    return {k: v for k, v in out.items() if k not in ("plan_ms_mean", "world_ms_per_plan")}


def _records(out: Path) -> list[dict[str, Any]]:
    return [_untimed(json.loads(line)) for line in (out / "results.jsonl").read_text().splitlines()[1:]]


def _metrics(out: Path) -> dict[str, Any]:
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in ("latency", "run")}


@pytest.fixture(scope="module")
def single(dataroot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert _eval(*_replay_argv(dataroot, out)) == 0
    return out


def test_replay_on_ray_writes_the_single_process_records_in_its_order(
        cluster: None, single: Path, dataroot: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    assert _eval(*_replay_argv(dataroot, out), "--ray", "--ray-workers", "2") == 0
    records = _records(out)
    assert len(records) == LIMIT and sum(r["status"] == "ok" for r in records) >= 4
    assert records == _records(single)
    assert _metrics(out) == _metrics(single)
    header = json.loads((out / "results.jsonl").read_text().splitlines()[0])["header"]
    assert header == json.loads((single / "results.jsonl").read_text().splitlines()[0])["header"]


def test_a_killed_worker_loses_and_repeats_no_sample(cluster: None, single: Path, dataroot: Path,
                                                     tmp_path: Path) -> None:
    from blockpilot.eval.evaluator import run_evaluation
    from blockpilot.eval.nuscenes import NuScenesSource
    from blockpilot.eval.ray_pool import RayPlannerPool, replay_mapper
    from blockpilot.eval.ray_worker import WorkerSpec
    from blockpilot.runtime.plan_types import DecoderSettings
    from blockpilot.runtime.sources import detect_source

    header = json.loads((single / "results.jsonl").read_text().splitlines()[0])["header"]
    spec = WorkerSpec(detect_source(SHIPPED_MODEL), {"decoder": DecoderSettings(name="scaffold")}, threads=1)
    with RayPlannerPool(spec, 2) as pool:
        victim = pool.pids()[0]
        killed: list[int] = []

        def kill_once(record: dict[str, Any]) -> None:  # the first record written: both workers are busy
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        run_evaluation(None, NuScenesSource(dataroot), tmp_path, header=header, limit=LIMIT, progress=False,
                       on_record=kill_once, map_samples=replay_mapper(pool))
        assert pool.deaths == 1 and victim not in pool.pids()
    records = _records(tmp_path)
    ids = [r["sample_id"] for r in records]
    assert len(ids) == len(set(ids)) == LIMIT
    assert records == _records(single)


def test_a_killed_driver_resumes_under_ray(cluster: None, single: Path, dataroot: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    full = (single / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(full[:7]) + full[7][:50])  # killed while writing the 7th record
    assert _eval(*_replay_argv(dataroot, out), "--ray", "--ray-workers", "2") == 0
    again = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert again[:7] == full[:7]
    assert _records(out) == _records(single)
    assert _metrics(out) == _metrics(single)


def test_closed_loop_driving_on_ray_scores_as_in_one_process(cluster: None, tmp_path: Path) -> None:
    argv = ("--closed-loop", "--world", "driving", "--checkpoint", str(SHIPPED_MODEL), "--seeds",
            f"{SEED}:{SEED + 2}", "--max-steps", "10", "--baselines", "cv")
    assert _eval(*argv, "--out", str(tmp_path / "one")) == 0
    assert _eval(*argv, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2") == 0
    one, on_ray = _records(tmp_path / "one"), _records(tmp_path / "ray")
    assert [r["sample_id"] for r in on_ray] == [f"{p}/{s}" for s in (SEED, SEED + 1) for p in ("model", "cv")]
    assert on_ray == one and all(r["status"] == "ok" for r in on_ray)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text())["policies"] for d in ("one", "ray")]
    for summary in summaries:
        for policy in summary.values():
            policy.pop("plan_ms")
            policy.pop("overhead_vs_plan")
    assert summaries[0] == summaries[1]
    assert sorted(p.name for p in (tmp_path / "ray" / "trajectories").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "trajectories").iterdir())


def test_closed_loop_robot_baselines_on_ray_write_the_single_process_records(cluster: None, tmp_path: Path) -> None:
    argv = ("--closed-loop", "--baselines", "expert,hold", "--episodes", "1", "--max-steps", "10")
    assert _eval(*argv, "--out", str(tmp_path / "one")) == 0
    assert _eval(*argv, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2") == 0
    strip = [{k: v for k, v in r.items() if k != "plan_ms"} for r in _records(tmp_path / "ray")]
    assert strip == [{k: v for k, v in r.items() if k != "plan_ms"} for r in _records(tmp_path / "one")]
    assert len(strip) == 2 and (tmp_path / "ray" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "ray" / "frames").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "frames").iterdir())


@pytest.fixture(scope="module")
def lerobot(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-init so101-joints checkpoint and a 2-episode LeRobot dataset written by our writer."""
    from test_robot_eval import _episode

    from blockpilot.sim.robot.lerobot_io import write_lerobot_dataset
    from blockpilot.vla.plans import SO101_JOINTS
    from blockpilot.vla.reference_model import write_reference_checkpoint

    root = tmp_path_factory.mktemp("ray_lerobot")
    return {"ckpt": write_reference_checkpoint(root / "ckpt"),
            "data": write_lerobot_dataset([_episode(s, n, SO101_JOINTS) for s, n in ((0, 4), (1, 3))], root / "data")}


def _lerobot_argv(lerobot: dict[str, Path]) -> tuple[str, ...]:
    return ("--source", "lerobot", "--dataroot", str(lerobot["data"]), "--checkpoint", str(lerobot["ckpt"]),
            "--schema", "so101-joints")


def _single_lerobot(lerobot: dict[str, Path], tmp_path: Path) -> Path:
    """The single-process replay's results.jsonl."""
    assert _eval(*_lerobot_argv(lerobot), "--out", str(tmp_path / "one")) == 0
    return tmp_path / "one" / "results.jsonl"


def test_lerobot_replay_on_ray_writes_the_single_process_records_and_metrics(
        cluster: None, lerobot: dict[str, Path], tmp_path: Path) -> None:
    _single_lerobot(lerobot, tmp_path)
    assert _eval(*_lerobot_argv(lerobot), "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2") == 0

    def records(out: Path) -> list[dict[str, Any]]:
        return [_untimed(json.loads(line)) for line in (out / "results.jsonl").read_text().splitlines()]

    def metrics(out: Path) -> dict[str, Any]:
        return {k: v for k, v in json.loads((out / "report" / "metrics.json").read_text()).items()
                if k != "latency_ms"}

    one, on_ray = records(tmp_path / "one"), records(tmp_path / "ray")
    assert [(r["episode"], r["frame"]) for r in on_ray] == [(0, f) for f in range(4)] + [(1, f) for f in range(3)]
    assert all(r["status"] == "ok" and len(r["pred"]) == 8 and "stage_ms" in json.loads(line)["stats"]
               for r, line in zip(on_ray, (tmp_path / "ray" / "results.jsonl").read_text().splitlines(),
                                  strict=True))
    assert on_ray == one
    assert metrics(tmp_path / "ray") == metrics(tmp_path / "one")
    assert metrics(tmp_path / "ray")["counts"]["total"] == 7
    assert (tmp_path / "ray" / "report" / "summary.md").is_file()


def test_a_killed_worker_loses_no_lerobot_frame(cluster: None, lerobot: dict[str, Path], tmp_path: Path) -> None:
    from blockpilot.eval.ray_pool import RayPlannerPool, robot_replay_mapper
    from blockpilot.eval.ray_worker import WorkerSpec
    from blockpilot.eval.robot_eval import open_robot_source, replay_robot
    from blockpilot.runtime.plan_types import DecoderSettings
    from blockpilot.runtime.sources import detect_source
    from blockpilot.vla.plans import ActionChunkSchema

    schema = ActionChunkSchema.so101_joints()
    source = open_robot_source(lerobot["data"], chunk=schema.steps)
    options = {"decoder": DecoderSettings(name="scaffold"), "schema": schema}
    spec = WorkerSpec(detect_source(lerobot["ckpt"]), options, threads=1)
    with RayPlannerPool(spec, 2) as pool:
        victim = pool.pids()[0]
        planned = robot_replay_mapper(pool)

        def kill_after_the_first(observations: Any) -> Any:  # both workers hold a frame when the first answers
            for n, answer in enumerate(planned(observations)):
                if n == 0:
                    os.kill(victim, signal.SIGKILL)
                yield answer

        records, _ = replay_robot(SimpleNamespace(schema=schema), source, map_plans=kill_after_the_first)
        assert pool.deaths == 1 and victim not in pool.pids()
    one = [_untimed(json.loads(line)) for line in
           _single_lerobot(lerobot, tmp_path).read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert [_untimed(r) for r in records] == one and all(r["status"] == "ok" for r in records)


def test_ray_not_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, dataroot: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed: importing it fails
    assert _eval(*_replay_argv(dataroot, tmp_path / "run"), "--ray") == 2
    err = capsys.readouterr().err
    assert "--ray" in err and "pip install 'blockpilot[ray]'" in err
    assert not (tmp_path / "run").exists()
    assert _eval(*_replay_argv(dataroot, tmp_path / "run"), "--ray-workers", "2") == 2
    assert "--ray-workers" in capsys.readouterr().err
