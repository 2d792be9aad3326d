"""Closed-loop robot evaluation (``blockpilot eval --closed-loop``): a planner drives the SO-101 arm in MuJoCo.

:class:`PlannerPolicy` wraps a :class:`~blockpilot.runtime.planner.Planner` whose action-chunk schema fits the
environment's ``dx, dy, dz, gripper`` action (``--schema so101-ee``) as a
:class:`~blockpilot.sim.robot.closed_loop.ChunkPolicy`: each time it is asked it plans once and hands back the first
``execute`` rows of the chunk. :func:`run_closed_loop` runs every policy (the planner, then the baselines) on every
seed, one JSON line per episode in ``results.jsonl`` (resumable as the replay evaluator's: the header must match, a
finished ``policy/seed`` is not run again, a line cut short by a kill is dropped and run again), then writes
``summary.json`` (:func:`closed_loop_summary`) and the report (:mod:`.robot_closed_loop_report`).

Seeds: training data is recorded from seeds below :data:`HELD_OUT_START`; evaluation uses seeds from it on.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic_io import atomic_open, atomic_write
from ..errors import BlockpilotError
from ..sim.robot.closed_loop import HELD_OUT_START
from .records import ResultsWriter
from .replay import EvalUsageError
from .summary import percentiles_and_mean

__all__ = ["HELD_OUT_START", "ClosedLoopUsageError", "PlanAnswerError", "PlannerPolicy", "open_planner_policy",
           "run_closed_loop"]

RESULTS_FILE, SUMMARY_FILE, FRAMES_DIR = "results.jsonl", "summary.json", "frames"
ENV_DIMS = ("dx", "dy", "dz", "gripper")  # the environment's action, in the so101-ee schema's names
RESUME_KEYS = ("kind", "task", "model", "backend", "decoder", "schema", "execute", "max_steps", "image_size",
               "render")
Z95 = 1.959963984540054


class ClosedLoopUsageError(EvalUsageError):
    """A bad ``--closed-loop`` invocation (task, seeds, schema that does not fit the environment); names the flag."""


class PlanAnswerError(BlockpilotError, ValueError):
    """The planner's answer did not parse into an action chunk; ends that episode as a failure."""


def check_env_schema(schema: Any, flag: str) -> None:
    """Raise :class:`ClosedLoopUsageError` naming ``flag`` unless ``schema`` answers the environment's own action
    (an action chunk of ``dx, dy, dz, gripper``) from state the simulator gives: the six joint positions, and dims
    derived from its ``environment_state`` and ``ee_pose`` (:mod:`blockpilot.vla.robot_state`)."""
    from ..vla.plans import SO101_JOINTS, ActionChunkSchema
    from ..vla.robot_state import EE_POSE, ENV_STATE, JOINTS, unfillable_dims

    if not isinstance(schema, ActionChunkSchema):
        raise ClosedLoopUsageError(f"{flag}: the simulator runs action chunks of {', '.join(ENV_DIMS)}; this model "
                                   f"answers a {type(schema).__name__} (use --schema so101-ee)")
    if tuple(schema.dims) != ENV_DIMS:
        raise ClosedLoopUsageError(f"{flag}: the schema's action dims {list(schema.dims)} do not fit the simulator's "
                                   f"{list(ENV_DIMS)} (use --schema so101-ee)")
    missing = unfillable_dims(schema.state_dims, {JOINTS, ENV_STATE, EE_POSE}, joints=SO101_JOINTS)
    if missing:
        raise ClosedLoopUsageError(f"{flag}: the schema's state dim(s) {', '.join(missing)} are not something the "
                                   f"simulator gives (the joints {', '.join(SO101_JOINTS)}, or a dim derived from "
                                   f"its environment_state and ee_pose)")


class PlannerPolicy:
    """A planner as a closed-loop policy: one plan per call, its first ``execute`` rows (default: all) returned.
    ``last_stats`` is (total plan ms, forwards) of the latest plan, which the episode runner records."""

    needs_images = True

    def __init__(self, planner: Any, execute: int | None = None, *, name: str = "model") -> None:
        check_env_schema(planner.schema, "--schema")
        steps = int(planner.schema.steps)
        if execute is not None and not 1 <= execute <= steps:
            raise ClosedLoopUsageError(f"--execute {execute}: must be 1..{steps} (the chunk's steps)")
        self.planner, self.execute, self.name = planner, execute or steps, name
        self.last_stats: tuple[float, int] | None = None

    def reset(self, seed: int) -> None:
        self.last_stats = None

    def act(self, observation: Any) -> npt.NDArray[np.float64]:
        from ..runtime.plan_types import RobotObservation
        from ..vla.plans import SO101_JOINTS
        from ..vla.robot_state import compose_state

        dims = self.planner.schema.state_dims
        state = observation.state if not dims else compose_state(
            dims, dict(zip(SO101_JOINTS, np.asarray(observation.state).tolist(), strict=True)),
            environment_state=observation.environment_state, ee_pose=observation.ee_pose, where="simulator observation")
        plan = self.planner.plan_robot(RobotObservation(images=observation.images, instruction=observation.instruction,
                                                        state=state, gripper=observation.gripper))
        stages = plan.stats.stage_ms
        self.last_stats = (float(stages.get("total", sum(stages.values()))), int(plan.stats.forwards))
        if plan.plan is None:
            raise PlanAnswerError(f"the answer did not parse: {plan.error}")
        return np.asarray(plan.plan.actions, dtype=np.float64)[:self.execute]


def open_planner_policy(checkpoint: str, execute: int) -> PlannerPolicy:
    """A robot checkpoint's planner (torch, float32, scaffold decoder, one thread) as a closed-loop policy running
    ``execute`` rows per plan: the driver of ``train-robot --dagger``'s rollouts."""
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import open_planner

    planner = open_planner(checkpoint, backend="torch", decoder=DecoderSettings(name="scaffold"),
                           kinds=("checkpoint",), flag="--dagger")
    return PlannerPolicy(planner, execute, name="dagger")


def parse_seeds(text: str) -> range:
    """``--seeds A:B``: seeds A (inclusive) to B (exclusive), 0 <= A < B."""
    parts = text.split(":")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise ClosedLoopUsageError(f"--seeds {text!r}: expected A:B, two integers (e.g. {HELD_OUT_START}:"
                                   f"{HELD_OUT_START + 20})") from None
    if not 0 <= start < stop:
        raise ClosedLoopUsageError(f"--seeds {text!r}: need 0 <= A < B")
    return range(start, stop)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a success rate (95 % by default); None for no episode."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def policy_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One policy's numbers over its episode records."""
    n = len(records)
    wins = [r for r in records if r["success"]]
    interval = wilson_interval(len(wins), n)
    plans = [v for r in records for v in r["plan_ms"]]
    forwards = [v for r in records for v in r["forwards"]]
    errors = [r for r in records if r["status"] == "failed"]
    return {"episodes": n, "succeeded": len(wins), "success_rate": len(wins) / n if n else None,
            "success_ci95": list(interval) if interval else None,
            "mean_steps": _mean([r["steps"] for r in records]),
            "mean_time_to_success_s": _mean([r["time_to_success_s"] for r in wins]),
            "collisions_per_episode": _mean([r["collisions"] for r in records]),
            "arm_contacts": sum(r["arm_contacts"] for r in records),
            "knocked_off": sum(bool(r["knocked_off"]) for r in records),
            "mean_final_distance_m": _mean([r["final_distance_m"] for r in records]),
            "errors": len(errors), "first_error": errors[0]["error"] if errors else None,
            "plan_ms": {"plans": len(plans), **percentiles_and_mean(plans)},
            "forwards_per_plan": _mean(forwards)}


def worst_episode(records: Sequence[dict[str, Any]], policy: str) -> dict[str, Any] | None:
    """``policy``'s worst episode: a failure furthest from its target, else the longest success."""
    mine = [r for r in records if r["policy"] == policy]
    if not mine:
        return None
    return max(mine, key=lambda r: (not r["success"], r["final_distance_m"] if not r["success"] else r["steps"]))


def closed_loop_summary(header: dict[str, Any], records: Sequence[dict[str, Any]],
                        order: Sequence[str]) -> dict[str, Any]:
    """``summary.json``: the run's settings and each policy's numbers (policies in ``order`` first)."""
    names = list(dict.fromkeys([*order, *(r["policy"] for r in records)]))
    policies = {name: policy_summary([r for r in records if r["policy"] == name]) for name in names}
    worst = worst_episode(records, names[0]) if names else None
    return {"header": header, "policies": {k: v for k, v in policies.items() if v["episodes"]},
            "worst": None if worst is None else {"policy": worst["policy"], "seed": worst["seed"]}}


def _strip_path(out: Path, policy: str, seed: int) -> Path:
    return out / FRAMES_DIR / f"{policy}-{seed}.npz"


def _save_strip(path: Path, frames: npt.NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, frames=frames)


def closed_loop_header(config: Any, seeds: range, *, execute: int | None = None, max_steps: int | None = None,
                       planner: Any = None, model: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """A closed-loop run's header (what resuming checks, what the report states); ``planner``: the model's, if any."""
    header: dict[str, Any] = {"kind": "closed_loop", "task": config.task, "model": model, "backend": backend,
                              "decoder": None, "schema": None, "execute": execute, "max_steps": max_steps,
                              "image_size": config.image_size, "render": config.render,
                              "cameras": list(config.cameras),
                              "seeds": [seeds.start, seeds.stop], "held_out_start": HELD_OUT_START}
    if planner is not None:
        schema = planner.schema
        header.update(decoder=planner.settings.to_dict(), dtype=getattr(planner.backend, "dtype", None),
                      schema={"dims": list(schema.dims), "steps": int(schema.steps), "rate_hz": float(schema.rate_hz)})
    return header


def robot_one(policy: Any, seed: int, config: Any, keep_frames: bool,
              errors: tuple[type[BaseException], ...] = (), sim: Any = None) -> tuple[dict[str, Any], Any]:
    """One episode of ``policy`` from ``seed``: its results line and its strip of frames (None unless
    ``keep_frames``). ``sim``: a simulator session of ``config`` to reset rather than build one."""
    from ..sim.robot.closed_loop import run_closed_loop_episode

    episode = run_closed_loop_episode(seed, policy, config, keep_frames=keep_frames, errors=errors, sim=sim)
    return {"sample_id": f"{policy.name}/{seed}", **episode.to_record()}, episode.frames


def _local_episodes(policies: Sequence[Any], jobs: Sequence[tuple[int, int]], config: Any,
                    errors: tuple[type[BaseException], ...]) -> Iterable[tuple[dict[str, Any], Any]]:
    """The episodes of ``jobs`` in this process, every one on one simulator session (building the environment
    and its renderer costs over a second; a reset gives each episode exactly what a fresh session would)."""
    from ..sim.robot.so101 import SimSession

    sim = None
    try:
        for k, seed in jobs:
            sim = sim or SimSession(config, seed)
            yield robot_one(policies[k], seed, config, k == 0, errors, sim=sim)
    finally:
        if sim is not None:
            sim.close()


def run_closed_loop(policies: Sequence[Any], seeds: Sequence[int], config: Any, out: Path, *,
                    header: dict[str, Any], overwrite: bool = False, errors: tuple[type[BaseException], ...] = (),
                    on_episode: Callable[[dict[str, Any]], None] | None = None,
                    map_episodes: Callable[[Sequence[tuple[int, int]]], Iterable[tuple[dict[str, Any], Any]]]
                    | None = None) -> dict[str, Any]:
    """Run every policy on every seed into ``out/results.jsonl`` (resuming a run of the same settings), then
    write ``out/summary.json`` and the report; returns the summary. The first policy's episodes keep a strip of
    frames (``out/frames/``) for the report. ``errors``: what a policy may raise that fails only its episode.
    ``map_episodes`` runs the (policy index, seed) episodes still to run elsewhere (:mod:`.ray_pool`), yielding
    :func:`robot_one`'s (record, frames) in the order given; this process writes them."""
    from .evaluator import _check_resume
    from .records import read_results
    from .robot_closed_loop_report import write_closed_loop_report

    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    if overwrite and path.exists():
        path.unlink()
    done = _check_resume(path, header, keys=RESUME_KEYS) if path.exists() else set()
    todo = [(k, seed) for seed in seeds for k, p in enumerate(policies) if f"{p.name}/{seed}" not in done]
    if map_episodes is None:
        map_episodes = lambda jobs: _local_episodes(policies, jobs, config, errors)  # noqa: E731
    with ResultsWriter(path, header=header) as writer:
        for record, frames in map_episodes(todo):
            if frames is not None:  # the strip first: a record always has its frames
                _save_strip(_strip_path(out, record["policy"], record["seed"]), frames)
            writer.write(record)
            if on_episode is not None:
                on_episode(record)
    _, records = read_results(path)
    wanted = {f"{p.name}/{s}" for p in policies for s in seeds}
    records = [r for r in records if r["sample_id"] in wanted]
    summary = closed_loop_summary(header, records, [p.name for p in policies])
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    write_closed_loop_report(summary, records, out)
    return summary


def headline(summary: dict[str, Any]) -> str:
    """One line per policy for a terminal."""
    lines = []
    for name, s in summary["policies"].items():
        ci = s["success_ci95"]
        latency = s["plan_ms"]
        lat = (f", plan p50/p90/p99 {latency['p50']:.1f}/{latency['p90']:.1f}/{latency['p99']:.1f} ms"
               if latency["plans"] and name not in ("expert", "hold") else "")
        lines.append(f"{name:7s} success {s['succeeded']}/{s['episodes']} = {100 * s['success_rate']:.1f} % "
                     f"(95 % CI {100 * ci[0]:.1f}..{100 * ci[1]:.1f}), mean length {s['mean_steps']:.1f} steps, "
                     f"collisions/episode {s['collisions_per_episode']:.2f}"
                     + (f", {s['errors']} errored" if s["errors"] else "") + lat)
    return "\n".join(lines)


def progress_line(record: dict[str, Any]) -> None:
    what = ("succeeded in" if record["success"] else "failed after") + f" {record['steps']} steps"
    tail = f" ({record['error']})" if record["error"] else ""
    print(f"{record['policy']} seed {record['seed']}: {what}{tail}", file=sys.stderr)
