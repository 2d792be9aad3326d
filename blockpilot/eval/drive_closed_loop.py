"""Closed-loop driving runs (``blockpilot eval --closed-loop --world driving``): episodes into ``results.jsonl``,
then ``summary.json``.

Every policy (the planner first, then the baselines: the expert, the upper bound, and constant velocity) drives every
seed (:func:`blockpilot.sim.drive.episode.run_episode`). One JSON line per episode (``sample_id`` =
``policy/seed``) holds the NAVSIM PDM sub-scores and score (:mod:`.closed_loop_metrics`), the Bench2Drive scores and
infractions (:mod:`.closed_loop_b2d`), the collisions, plan counts and times. The file resumes as the replay
evaluator's does: the header must match (:data:`RESUME_KEYS`), a finished episode is not run again, a line cut short
by a kill is dropped and run again. ``summary.json`` aggregates per policy: means of every sub-score and score,
success rate with its Wilson 95 % interval, infractions per km over the distance driven, the plan latency
(percentiles over episodes of each episode's mean plan time) and the
closed-loop overhead (the world's time: rendering, control and stepping, over the plan time); the report
(``report.html`` and ``report.md`` with its plots) is :mod:`.drive_closed_loop_report`.

Seeds: generated scenes from :data:`~blockpilot.eval.synthetic.HELDOUT_SEED_BASE` on are held out from training.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_io import atomic_write
from ..sim.drive.episode import DriveConfig, DriveLog, run_episode
from ..sim.drive.policies import ConstantVelocityPolicy, DrivePolicy, ExpertPolicy
from ..sim.drive.world import DriveWorld
from .closed_loop_b2d import PENALTIES, driving_scores
from .closed_loop_metrics import collisions, pdm_scores
from .drive_closed_loop_report import save_trajectory, write_drive_report
from .records import ResultsWriter
from .robot_closed_loop import wilson_interval
from .summary import percentiles_and_mean
from .synthetic import HELDOUT_SEED_BASE

RESULTS_FILE, SUMMARY_FILE = "results.jsonl", "summary.json"
RESUME_KEYS = ("kind", "world", "model", "backend", "decoder", "config", "compare")
BASELINES = {"expert": ExpertPolicy, "cv": lambda world: ConstantVelocityPolicy()}
SUB_SCORES = ("nc", "dac", "ddc", "ep", "ttc", "comfort", "pdms", "pdms_v1_0")

PolicyFactory = Callable[[DriveWorld], DrivePolicy]
EpisodeMapper = Callable[[Sequence[tuple[str, int]]], Iterable[tuple[dict[str, Any], DriveLog | None]]]


def drive_header(config: DriveConfig, seeds: Sequence[int], *, model: str | None = None, backend: str | None = None,
                 decoder: dict[str, Any] | None = None, dtype: str | None = None) -> dict[str, Any]:
    """What resuming checks and the summary states."""
    return {"kind": "closed_loop", "world": "driving", "model": model, "backend": backend, "decoder": decoder,
            "dtype": dtype, "config": json.loads(json.dumps(asdict(config))), "seeds": [min(seeds), max(seeds) + 1],
            "held_out_start": HELDOUT_SEED_BASE}


def episode_record(name: str, seed: int, log: DriveLog, world: DriveWorld) -> dict[str, Any]:
    """One finished episode of policy ``name`` as a results line."""
    pdm, b2d = pdm_scores(log), driving_scores(log)
    ms = 1000.0 / max(log.plans, 1)
    return {"sample_id": f"{name}/{seed}", "status": "ok", "error": None, "policy": name, "seed": seed,
            "scene": log.name, "layout": world.scene.meta.get("layout"), "route_command": world.scene.route_command,
            "pdm": pdm.to_dict(), "driving": b2d.to_dict(),
            "collisions": [asdict(c) for c in collisions(log)],
            "plans": log.plans, "plan_failures": log.plan_failures,
            "plan_ms_mean": log.plan_s * ms, "world_ms_per_plan": log.world_s * ms,
            "route_length_m": log.route_length, "expert_progress_m": log.expert_progress,
            "final_speed_mps": float(log.ego[-1, 3])}


def failed_record(seed: int, policy: str, error: BaseException) -> dict[str, Any]:
    return {"sample_id": f"{policy}/{seed}", "status": "failed", "error": f"{type(error).__name__}: {error}",
            "policy": policy, "seed": seed}


def drive_one(name: str, factory: PolicyFactory, seed: int, config: DriveConfig,
              errors: tuple[type[BaseException], ...] = ()) -> tuple[dict[str, Any], DriveLog | None]:
    """One episode of policy ``name`` (made by ``factory``) from ``seed``: its results line and its log (None when
    the policy failed with one of ``errors``)."""
    world = DriveWorld.from_seed(seed)
    try:
        log = run_episode(world, factory(world), config)
    except errors as exc:
        return failed_record(seed, name, exc), None
    return episode_record(name, seed, log, world), log


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def policy_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One policy's numbers over its episodes (failed episodes count as failures and score 0)."""
    ok = [r for r in records if r["status"] == "ok"]
    n = len(records)
    wins = sum(bool(r["driving"]["success"]) for r in ok)
    interval = wilson_interval(wins, n)
    infractions = {k: sum(r["driving"]["infractions"].get(k, 0) for r in ok) for k in PENALTIES}
    km = sum(r["driving"]["driven_km"] for r in ok)
    plan = sum(r["plan_ms_mean"] * r["plans"] for r in ok)
    world = sum(r["world_ms_per_plan"] * r["plans"] for r in ok)
    failed = [r for r in records if r["status"] == "failed"]
    return {
        "episodes": n, "failed": len(failed), "first_error": failed[0]["error"] if failed else None,
        **{k: _mean([r["pdm"][k] for r in ok] + [0.0] * len(failed)) for k in SUB_SCORES},
        "route_completion": _mean([r["driving"]["route_completion"] for r in ok] + [0.0] * len(failed)),
        "driving_score": _mean([r["driving"]["driving_score"] for r in ok] + [0.0] * len(failed)),
        "success_rate": wins / n if n else None, "success_ci95": list(interval) if interval else None,
        "infractions": infractions, "driven_km": km,
        "infractions_per_km": sum(infractions.values()) / km if km > 0 else None,
        "plan_failures": sum(r["plan_failures"] for r in ok),
        "plan_ms": percentiles_and_mean([r["plan_ms_mean"] for r in ok]),
        "overhead_vs_plan": world / plan if plan > 0 else None,
    }


def drive_summary(header: dict[str, Any], records: Sequence[dict[str, Any]], order: Sequence[str]) -> dict[str, Any]:
    names = list(dict.fromkeys([*order, *(r["policy"] for r in records)]))
    policies = {name: policy_summary([r for r in records if r["policy"] == name]) for name in names}
    first = [r for r in records if r["policy"] == names[0] and r["status"] == "ok"] if names else []
    worst = sorted(first, key=lambda r: (r["pdm"]["pdms"], r["driving"]["driving_score"], r["seed"]))[:3]
    return {"header": header, "policies": {k: v for k, v in policies.items() if v["episodes"]},
            "worst": [{"policy": r["policy"], "seed": r["seed"], "pdms": r["pdm"]["pdms"]} for r in worst]}


def run_drive(policies: Sequence[tuple[str, PolicyFactory]], seeds: Sequence[int], config: DriveConfig, out: Path, *,
              header: dict[str, Any], overwrite: bool = False, errors: tuple[type[BaseException], ...] = (),
              on_episode: Callable[[dict[str, Any]], None] | None = None, report: bool = True,
              map_episodes: EpisodeMapper | None = None,
              pair: tuple[str, str] | None = None) -> dict[str, Any]:
    """Every (name, factory) policy on every seed into ``out/results.jsonl`` (resuming a run of the same
    settings), then ``out/summary.json`` and, with ``report``, the report
    (:mod:`.drive_closed_loop_report`); returns the summary. ``errors``: what a policy may raise that fails only its
    episode. ``map_episodes`` runs the (policy, seed) episodes still to run elsewhere (:mod:`.ray_pool`), yielding
    :func:`drive_one`'s (record, log) in the order given; this process writes them. ``pair`` (reference,
    candidate): their paired differences go into the summary as ``paired`` (:mod:`.drive_compare`)."""
    from .evaluator import _check_resume
    from .records import read_results

    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    if overwrite and path.exists():
        path.unlink()
    done = _check_resume(path, header, keys=RESUME_KEYS) if path.exists() else set()
    factories = dict(policies)
    todo = [(name, seed) for seed in seeds for name, _ in policies if f"{name}/{seed}" not in done]
    if map_episodes is None:
        map_episodes = lambda jobs: (drive_one(name, factories[name], seed, config, errors)  # noqa: E731
                                     for name, seed in jobs)
    with ResultsWriter(path, header=header) as writer:
        for record, log in map_episodes(todo):
            if log is not None:  # the trajectory first: a record always has its own
                save_trajectory(out, record["policy"], record["seed"], log)
            writer.write(record)
            if on_episode is not None:
                on_episode(record)
    _, records = read_results(path)
    wanted = {f"{name}/{s}" for name, _ in policies for s in seeds}
    records = [r for r in records if r["sample_id"] in wanted]
    summary = drive_summary(header, records, [n for n, _ in policies])
    if pair is not None:
        from .drive_compare import paired_difference

        summary["paired"] = paired_difference(records, *pair)
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    if report:
        write_drive_report(summary, records, out)
    return summary


def headline(summary: dict[str, Any]) -> str:
    """One line per policy for a terminal."""
    lines = []
    for name, s in summary["policies"].items():
        ci = s["success_ci95"] or [0.0, 0.0]
        per_km = s["infractions_per_km"]
        lines.append(f"{name:18s} PDMS {s['pdms']:.3f}  DS {s['driving_score']:.3f}  RC {s['route_completion']:.3f}  "
                     f"success {100 * s['success_rate']:.0f} % (95 % CI {100 * ci[0]:.0f}..{100 * ci[1]:.0f})  "
                     f"infractions/km {'-' if per_km is None else f'{per_km:.2f}'}"
                     + (f"  {s['failed']} failed" if s["failed"] else ""))
    return "\n".join(lines)


def progress_line(record: dict[str, Any]) -> None:
    if record["status"] != "ok":
        print(f"{record['policy']} seed {record['seed']}: failed ({record['error']})", file=sys.stderr)
        return
    print(f"{record['policy']} seed {record['seed']}: PDMS {record['pdm']['pdms']:.2f}, "
          f"DS {record['driving']['driving_score']:.2f}", file=sys.stderr)
