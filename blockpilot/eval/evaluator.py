"""Run one planner over a replay source: a JSONL record per sample, resumable, never stopped by one bad sample.

The planner is the same :class:`~blockpilot.runtime.planner.Planner` a car runs; this module only
feeds it recorded observations and scores what comes back (and a constant-velocity baseline beside
it) with :mod:`blockpilot.eval.metrics`. Aggregation and the report live in
:mod:`blockpilot.eval.summary` and :mod:`blockpilot.eval.report`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..geometry import constant_velocity
from ..progress_bars import is_terminal, live_bar
from ..runtime.backend import BackendError
from ..runtime.plan_types import Observation
from .metrics import (
    collisions_bev_planner,
    collisions_stp3,
    common_steps,
    l2_errors,
    rater_feedback_score,
    resample_trajectory,
)
from .records import ResultsFileError, ResultsWriter, read_results
from .types import EvalSample, FloatArray, SampleError, SampleFailure, Source

RESULTS_FILE = "results.jsonl"
REPORT_DIR = "report"
RFS_RATE_HZ = 4
# Header keys that must agree before a run may resume into an existing results file.
RESUME_KEYS = ("source", "checkpoint", "decoder", "schema")


class PlannerLike:
    """What the evaluator needs of a planner (the real :class:`Planner` has it)."""

    schema: Any
    settings: Any

    def plan(self, observation: Observation) -> Any:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass(frozen=True)
class RunSummary:
    results: Path
    total: int
    resumed: int
    written: int
    counts: dict[str, int]


def prediction_times(schema: Any) -> FloatArray:
    """The times of the schema's waypoints: ``(k + 1) / rate_hz`` for k < num_waypoints."""
    return (np.arange(int(schema.num_waypoints), dtype=np.float64) + 1.0) / float(schema.rate_hz)


def to_sample_frame(sample: EvalSample, xy_ego: FloatArray) -> FloatArray:
    """A trajectory of the ego reference point (ego frame at t0) in the sample's evaluation frame.

    In the lidar frame the tracked point is the sensor, mounted at ``extra["lidar_mount_xy"]`` (ego
    frame): at each step it sits at ``p + R(h) m`` with the heading h of the trajectory's own
    motion, and the frame's origin is the sensor at t0.
    """
    if sample.frame == "ego":
        return xy_ego
    mount = np.asarray(sample.extra.get("lidar_mount_xy", (0.0, 0.0)), dtype=np.float64)
    prev = np.vstack([np.zeros((1, 2)), xy_ego[:-1]])
    step = xy_ego - prev
    heading = np.zeros(len(xy_ego))
    last = 0.0
    for i, (dx, dy) in enumerate(step):
        if math.hypot(dx, dy) > 1e-3:
            last = math.atan2(dy, dx)
        heading[i] = last
    c, s = np.cos(heading), np.sin(heading)
    rotated = np.stack([c * mount[0] - s * mount[1], s * mount[0] + c * mount[1]], axis=1)
    return xy_ego + rotated - mount


def score_prediction(sample: EvalSample, times: FloatArray, xy: FloatArray) -> dict[str, Any] | None:
    """Per-sample metrics of one prediction against the sample's truth (schema of records.py)."""
    future = sample.future
    if future is None:
        return None
    ip, ig = common_steps(times, future.times_s)
    if not len(ip):
        return None
    pred, gt = xy[ip], future.xy[ig]
    out: dict[str, Any] = {
        "times_s": future.times_s[ig].tolist(),
        "l2": l2_errors(pred, gt).tolist(),
        "valid": future.valid[ig].tolist(),
        "coll_stp3": None, "coll_stp3_gt": None, "coll_bev": None, "rfs": None,
    }
    boxes = sample.agents.at(future.times_s[ig].tolist()) if sample.agents is not None else None
    if boxes is not None:
        offset = sample.ego_box_offset_m
        out["coll_stp3"] = collisions_stp3(pred, boxes, box_offset_m=offset).tolist()
        out["coll_stp3_gt"] = collisions_stp3(gt, boxes, box_offset_m=offset).tolist()
        out["coll_bev"] = collisions_bev_planner(pred, boxes, box_offset_m=offset).tolist()
    if sample.raters:
        out["rfs"] = _rfs(sample, times, xy)
    return out


def _rfs(sample: EvalSample, times: FloatArray, xy: FloatArray) -> dict[str, Any] | None:
    """The RFS on the prediction resampled to 4 Hz, over its whole seconds (at least 3 s)."""
    length_s = min(5, math.floor(float(times[-1]) + 1e-9))
    if length_s < 3:
        return None
    grid = np.arange(1, length_s * RFS_RATE_HZ + 1, dtype=np.float64) / RFS_RATE_HZ
    pred = resample_trajectory(xy, times, grid)
    raters = [(r.xy, float(r.score)) for r in sample.raters]
    result = rater_feedback_score(pred, raters, sample.init_speed_mps, frequency_hz=RFS_RATE_HZ, length_s=length_s)
    return result.to_dict()


def _trajectory_json(times: FloatArray, xy: FloatArray) -> dict[str, Any]:
    return {"times_s": [round(float(t), 6) for t in times], "xy": np.round(xy, 4).tolist()}


def _identity(sample: EvalSample | SampleFailure) -> dict[str, Any]:
    out: dict[str, Any] = {"sample_id": sample.sample_id, "source": sample.source, "scene": sample.scene}
    if isinstance(sample, EvalSample):
        out["timestamp_us"] = int(sample.timestamp_us)
    return out


def _truth_json(sample: EvalSample) -> dict[str, Any]:
    future, agents = sample.future, sample.agents
    return {
        "route_command": sample.route_command,
        "speed_mps": round(float(sample.ego.speed_mps), 4),
        "frame": sample.frame,
        "gt": None if future is None else {**_trajectory_json(future.times_s, future.xy),
                                           "valid": future.valid.tolist()},
        "agents": None if agents is None else {
            "times_s": agents.times_s.tolist(),
            "boxes": [np.round(b, 3).tolist() for b in agents.boxes],
            "kinds": [list(k) for k in agents.kinds]},
        "raters": [{"xy": np.round(r.xy, 4).tolist(), "score": float(r.score)} for r in sample.raters],
    }


def evaluate_sample(planner: PlannerLike, sample: EvalSample | SampleFailure) -> dict[str, Any]:
    """One JSONL record for one source item; sample and planner errors become a ``failed`` record."""
    record = _identity(sample)
    if isinstance(sample, SampleFailure):
        return {**record, "status": "skipped" if sample.kind == "skipped" else "failed", "error": sample.reason}
    record.update(_truth_json(sample))
    times = prediction_times(planner.schema)
    cv = constant_velocity(float(sample.ego.speed_mps), times)
    cv_frame = to_sample_frame(sample, cv)
    predictions: dict[str, Any] = {"cv": _trajectory_json(times, cv_frame)}
    metrics: dict[str, Any] = {}
    cv_metrics = score_prediction(sample, times, cv_frame)
    if cv_metrics is not None:
        metrics["cv"] = cv_metrics
    record.update(predictions=predictions, metrics=metrics, stats=None, text="")
    try:
        # A text-only model (config.vision None) plans from the ego state and route command alone.
        text_only = getattr(getattr(planner, "config", None), "vision", True) is None
        images = [] if text_only else sample.load_images()
        plan = planner.plan(Observation(images=images, ego=sample.ego, route_command=sample.route_command))
    except (SampleError, BackendError) as exc:
        return {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    stats = plan.stats
    record["stats"] = {"stage_ms": {k: round(float(v), 3) for k, v in stats.stage_ms.items()},
                       "forwards": int(stats.forwards), "tokens_per_forward": round(float(stats.tokens_per_forward), 4)}
    record["text"] = plan.text
    if plan.plan is None:
        return {**record, "status": "parse_error", "error": str(plan.error)}
    model = to_sample_frame(sample, np.asarray(plan.waypoints, dtype=np.float64))
    predictions["model"] = {**_trajectory_json(times, model), "behaviour": plan.behaviour}
    model_metrics = score_prediction(sample, times, model)
    if model_metrics is not None:
        metrics["model"] = model_metrics
    return {**record, "status": "ok", "error": None}


class SampleProgress:
    """A tqdm bar on a terminal (:mod:`blockpilot.progress_bars`); a line per 10% elsewhere (CI logs)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.tty = is_terminal(self.stream)
        self.bar = live_bar(total, "replay", stream=self.stream, unit="sample",
                            enabled=enabled and self.tty and total > 0)
        self.start = time.perf_counter()
        self._done = 0
        self._last_decile = -1

    def update(self, done: int, counts: dict[str, int]) -> None:
        if not self.enabled or self.total <= 0:
            return
        tail = " ".join(f"{k} {v}" for k, v in counts.items() if v)
        if self.tty:
            self.bar.set_postfix_str(tail, refresh=False)
            self.bar.update(done - self._done)
            self._done = done
            if done >= self.total:
                self.bar.close()
            return
        frac = done / self.total
        if int(frac * 10) != self._last_decile or done >= self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            self._last_decile = int(frac * 10)
            self.stream.write(f"[{'#' * int(24 * frac):<24}] {done}/{self.total} {tail} eta {eta:4.0f}s\n")
            self.stream.flush()

    def close(self) -> None:
        self.bar.close()


def _check_resume(path: Path, header: dict[str, Any], keys: Sequence[str] = RESUME_KEYS) -> set[str]:
    old_header, records = read_results(path)
    if old_header is not None:
        for key in keys:
            if old_header.get(key) != header.get(key):
                raise ResultsFileError(
                    f"{path}: written for a different {key} ({old_header.get(key)!r}, now {header.get(key)!r}); "
                    "pass --overwrite to start again or choose another --out")
        # Runs written before --dtype planned in float32 (torch) or the bundle's dtype (no key either way).
        old_dtype, new_dtype = old_header.get("dtype", "float32"), header.get("dtype", "float32")
        if old_dtype != new_dtype:
            raise ResultsFileError(f"{path}: written for dtype {old_dtype}, now {new_dtype}; pass --overwrite to "
                                   "start again, choose another --out, or plan with --dtype " + old_dtype)
    return {r["sample_id"] for r in records}


# Turns the samples still to plan into their records, in the order given (the default plans them one by one here;
# :mod:`blockpilot.eval.ray_pool` plans them on Ray workers). The records are written by the caller of the mapper.
SampleMapper = Callable[[Iterable[EvalSample | SampleFailure]], Iterable[dict[str, Any]]]


def run_evaluation(planner: PlannerLike | None, source: Source, out_dir: str | Path, *, header: dict[str, Any],
                   limit: int | None = None, overwrite: bool = False, progress: bool = True,
                   on_record: Callable[[dict[str, Any]], None] | None = None,
                   map_samples: SampleMapper | None = None) -> RunSummary:
    """Evaluate every item of ``source`` (the first ``limit``) into ``out_dir/results.jsonl``.

    An existing results file for the same settings is resumed: finished samples are not planned
    again. ``overwrite`` starts from scratch. ``map_samples`` plans the samples elsewhere (``planner`` is then
    unused): it must yield one record per sample, in the order given; this process writes them all.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    if overwrite and path.exists():
        path.unlink()
    done = _check_resume(path, header) if path.exists() else set()
    total = len(source) if limit is None else min(len(source), limit)
    counts = {"ok": 0, "parse_error": 0, "failed": 0, "skipped": 0}
    bar = SampleProgress(total, enabled=progress)
    written = resumed = 0

    def pending() -> Iterable[EvalSample | SampleFailure]:
        nonlocal resumed
        for item in _limited(source, limit):
            if item.sample_id in done:
                resumed += 1
            else:
                yield item

    if map_samples is None:
        if planner is None:
            raise ValueError("run_evaluation needs a planner or map_samples")
        local: PlannerLike = planner
        map_samples = lambda items: (evaluate_sample(local, item) for item in items)  # noqa: E731
    with ResultsWriter(path, header=header) as writer, contextlib.closing(bar):
        for record in map_samples(pending()):
            writer.write(record)
            written += 1
            counts[record["status"]] += 1
            if on_record is not None:
                on_record(record)
            bar.update(written + resumed, counts)
        bar.update(written + resumed, counts)
    return RunSummary(results=path, total=total, resumed=resumed, written=written, counts=counts)


def _limited(source: Iterable[EvalSample | SampleFailure], limit: int | None) -> Iterable[EvalSample | SampleFailure]:
    for index, item in enumerate(source):
        if limit is not None and index >= limit:
            return
        yield item
