"""Device benchmark: the planner over N held-out generated observations, latency percentiles per stage next to
tegrastats power and temperature over the timed window (latency only where tegrastats is absent, e.g. on x86).

Warm-up plans (CUDA graph capture, allocator growth, cold caches) run before the window and are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import BlockpilotError
from .tegrastats import TegrastatsRecorder, TegrastatsSummary

STAGES = ("prompt", "vision", "prefill", "decode", "parse", "total")
PERCENTILES = (50, 90, 99)


class JetsonBenchError(BlockpilotError, ValueError):
    """A benchmark that cannot run as asked."""


class _Planner(Protocol):
    def plan(self, observation: Any) -> Any: ...


def heldout_observations(count: int, *, first_seed: int | None = None) -> list[Any]:
    """``count`` observations from held-out generated scenes (seeds training never uses), in a fixed order."""
    from ..eval.synthetic import HELDOUT_SEED_BASE, heldout_keyframes, observation

    if count < 1:
        raise JetsonBenchError(f"samples must be at least 1, got {count}")
    seed = HELDOUT_SEED_BASE if first_seed is None else first_seed
    keyframes: list[Any] = []
    scenes = 1
    while len(keyframes) < count:
        keyframes = heldout_keyframes(scenes, first_seed=seed)
        scenes *= 2
    return [observation(k) for k in keyframes[:count]]


def latency_table(stage_ms: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per stage: p50 / p90 / p99 (numpy's linear method), mean and max, in ms."""
    out: dict[str, dict[str, float]] = {}
    for stage, values in stage_ms.items():
        arr = np.asarray(values, dtype=np.float64)
        if not arr.size:
            continue
        row = {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True)}
        out[stage] = {**row, "mean": float(arr.mean()), "max": float(arr.max())}
    return out


@dataclass(frozen=True)
class BenchResult:
    samples: int
    warmup: int
    parsed: int
    latency_ms: dict[str, dict[str, float]]
    forwards_per_plan: float
    tokens_per_forward: float
    wall_s: float
    planner: Mapping[str, Any]
    platform: Mapping[str, Any] | None
    tegrastats: TegrastatsSummary | None
    tegrastats_note: str

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "warmup": self.warmup, "parsed": self.parsed,
                "latency_ms": {s: {k: round(v, 3) for k, v in row.items()} for s, row in self.latency_ms.items()},
                "forwards_per_plan": round(self.forwards_per_plan, 3),
                "tokens_per_forward": round(self.tokens_per_forward, 3), "wall_s": round(self.wall_s, 3),
                "planner": dict(self.planner), "platform": dict(self.platform) if self.platform else None,
                "tegrastats": self.tegrastats.to_dict() if self.tegrastats else None,
                "tegrastats_note": self.tegrastats_note}

    def table(self) -> str:
        who = ", ".join(f"{k} {v}" for k, v in self.planner.items())
        where = f"{self.platform['module']} (L4T {self.platform.get('l4t')})" if self.platform else "not a Jetson"
        rows = [f"bench      {self.samples} plans after {self.warmup} warm-up, {self.parsed} parsed; {who}",
                f"device     {where}", f"  {'stage':<8} {'p50':>9} {'p90':>9} {'p99':>9} {'mean':>9} {'max':>9}  (ms)"]
        for stage, row in self.latency_ms.items():
            rows.append(f"  {stage:<8} " + " ".join(f"{row[k]:>9.2f}" for k in ("p50", "p90", "p99", "mean", "max")))
        rows.append(f"forwards   {self.forwards_per_plan:.1f} per plan, {self.tokens_per_forward:.2f} tokens per "
                    f"forward; {self.wall_s:.1f} s timed")
        rows.append(self.tegrastats.table() if self.tegrastats else f"tegrastats {self.tegrastats_note}")
        return "\n".join(rows)


def run_jetson_bench(planner: _Planner, observations: Sequence[Any], *, warmup: int = 2,
              recorder: TegrastatsRecorder | None = None, recorder_note: str = "not requested",
              describe: Mapping[str, Any] | None = None, platform: Mapping[str, Any] | None = None,
              clock: Callable[[], float] = time.monotonic, first_sample_timeout: float = 5.0) -> BenchResult:
    """Plan every observation once (after ``warmup`` untimed plans cycling through them) and collect the stage
    timings each :class:`~blockpilot.runtime.plan_types.Plan` reports. ``recorder`` (not yet started) runs for the
    whole benchmark (its first sample awaited up to ``first_sample_timeout`` s) and is summarised over the timed
    window only; it uses the same ``clock``."""
    if not observations:
        raise JetsonBenchError("no observations to plan")
    if warmup < 0:
        raise JetsonBenchError(f"warmup must be >= 0, got {warmup}")
    if recorder is not None:
        recorder.clock = clock
        recorder.start()
    try:
        if recorder is not None:
            recorder.wait_for_sample(first_sample_timeout)  # its first line comes one interval after the start
        for i in range(warmup):
            planner.plan(observations[i % len(observations)])
        stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
        forwards: list[float] = []
        tokens: list[float] = []
        parsed = 0
        start = clock()
        for obs in observations:
            plan = planner.plan(obs)
            for stage in STAGES:
                if stage in plan.stats.stage_ms:
                    stage_ms[stage].append(float(plan.stats.stage_ms[stage]))
            forwards.append(float(plan.stats.forwards))
            tokens.append(float(plan.stats.tokens_per_forward))
            parsed += int(plan.plan is not None)
        end = clock()
        summary = recorder.summary(start, end) if recorder is not None else None
    finally:
        if recorder is not None:
            recorder.stop()
    note = recorder_note
    if recorder is not None:
        note = (f"{summary.samples} samples in the window" if summary is not None and summary.samples
                else "running, but no sample fell inside the timed window (raise --samples or lower --interval-ms)")
    return BenchResult(samples=len(observations), warmup=warmup, parsed=parsed, latency_ms=latency_table(stage_ms),
                       forwards_per_plan=float(np.mean(forwards)), tokens_per_forward=float(np.mean(tokens)),
                       wall_s=end - start, planner=dict(describe or {}), platform=platform,
                       tegrastats=summary if summary is not None and summary.samples else None, tegrastats_note=note)
