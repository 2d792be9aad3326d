"""Aggregate per-sample result records (see :mod:`blockpilot.eval.records`) into one JSON-ready summary.

Every number is a finite float or ``None`` (nothing to average). Each predictor, ``"model"`` (the
planner under test) and ``"cv"`` (constant velocity), is aggregated over its ``metrics`` entries with
the conventions of the planning literature; the baseline only over the records the model was scored
on (a plan that did not parse or a failed sample drops out of both), so the two are like for like:

* **Full-future samples** (the set for L2 and collisions, as in ST-P3 and VAD): every step at or before
  3 s is valid and the steps include 1, 2 and 3 s. Samples whose future ends early or has an invalid
  step are counted as ``excluded_partial_future``; samples on a grid without those three points as
  ``excluded_other``.
* **L2, ST-P3/VAD ("average up to t")**: per sample, the mean L2 over the steps at or before t; then
  the mean over samples. **L2, UniAD ("at t")**: per sample, the L2 at the step at t; mean over samples.
  ``avg`` is the mean of the 1, 2 and 3 s values (the tables' "Avg." column).
* **Collision, ST-P3/VAD** (percent; samples whose ``coll_stp3`` is not null): a step is a hit when the
  plan collides and the ground truth does not (steps where the logged ego itself collides count as no
  hit, as the reference code does); per sample the mean hit over steps at or before t; mean over
  samples times 100. **UniAD ("at t")** uses the hit at the step at t. ``gt_collision_steps`` counts
  the steps (at or before 3 s) where the ground truth collides, an annotation sanity check.
* **Collision, BEV-Planner** (percent): per sample the maximum of ``coll_bev`` over the steps at or
  before t (no exclusion); mean over samples times 100.
* **ADE/FDE at 3 s and 5 s**: on samples whose steps up to the horizon are all valid and that have a
  step at the horizon; ADE is the mean L2 over those steps, FDE the L2 at the horizon; mean over
  samples (``None`` when no sample qualifies, e.g. 5 s on 2 Hz nuScenes futures to 3 s).
* **RFS** (WOD-E2E rater feedback score): the mean score over records that have one, the mean per
  horizon, and the percentage of samples inside a rater's trust region.

Counts run over all records: by status, ``parse_rate = ok / (ok + parse_error)``, and every failure
(``failed`` and ``parse_error`` records) with its message. Latency takes the percentiles (numpy,
linear) of ``stats.stage_ms`` per stage over the records that have stats, and the mean forwards per
plan and tokens per forward. ``worst_cases`` ranks the samples with a model score by the model's L2 at
its last valid step. The run header is copied under ``"run"``.

Layout: ``{"run", "counts", "model", "cv", "latency", "worst_cases"}`` (``counts`` holds ``total``, one
count per status, ``parse_rate`` and ``failures``); each predictor holds ``l2`` (metres)
and ``collision`` (percent) as ``{"stp3_vad": {"1", "2", "3", "avg"}, "uniad": {...}}`` (collision also
``bev_planner``), ``ade_fde`` (metres) keyed by horizon ``"3"``/``"5"``, ``rfs`` and the sample counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .metrics import percentiles
from .records import STATUSES

PREDICTORS = ("model", "cv")
HORIZONS_S = (1.0, 2.0, 3.0)
ADE_HORIZONS_S = (3.0, 5.0)
PERCENTILES = (50, 90, 99)
TIME_TOL_S = 1e-3
WORST_CASES = 10

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def hkey(t: float) -> str:
    """The JSON key of a horizon: ``1.0 -> "1"``, ``2.5 -> "2.5"``."""
    return f"{t:g}"


def num(x: Any) -> float | None:
    """A finite float, or ``None`` for a missing or non-finite value."""
    if x is None or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return num(np.mean(kept)) if kept else None


@dataclass(frozen=True)
class Steps:
    """One predictor's metric entry of one record, as arrays (missing optional series are ``None``)."""

    sample_id: str
    times: FloatArray
    l2: FloatArray
    valid: BoolArray
    coll: BoolArray | None
    coll_gt: BoolArray | None
    bev: BoolArray | None

    def index(self, t: float) -> int | None:
        hit = np.flatnonzero(np.abs(self.times - t) <= TIME_TOL_S)
        return int(hit[0]) if hit.size else None

    def upto(self, t: float) -> BoolArray:
        return np.asarray(self.times <= t + TIME_TOL_S)

    def complete_to(self, t: float) -> bool:
        """Every step up to ``t`` valid (with a finite L2) and a step at ``t``."""
        upto = self.upto(t)
        return self.index(t) is not None and bool(np.all(self.valid[upto] & np.isfinite(self.l2[upto])))

    def last_valid(self) -> int | None:
        ok = np.flatnonzero(self.valid & np.isfinite(self.l2))
        return int(ok[-1]) if ok.size else None

    def l2_at(self, t: float) -> float | None:
        i = self.index(t)
        return num(self.l2[i]) if i is not None and self.valid[i] else None


def _floats(values: Any, n: int) -> FloatArray | None:
    if not isinstance(values, list) or len(values) != n:
        return None
    return np.array([np.nan if num(v) is None else float(v) for v in values], dtype=np.float64)


def _bools(values: Any, n: int) -> BoolArray | None:
    if not isinstance(values, list) or len(values) != n:
        return None
    return np.array([bool(v) for v in values], dtype=np.bool_)


def steps_of(record: dict[str, Any], predictor: str) -> Steps | None:
    """The record's metric entry for ``predictor`` as :class:`Steps`, or ``None`` if it has none."""
    metric = (record.get("metrics") or {}).get(predictor)
    if not isinstance(metric, dict) or not isinstance(metric.get("times_s"), list):
        return None
    n = len(metric["times_s"])
    times = _floats(metric["times_s"], n)
    l2 = _floats(metric.get("l2"), n)
    valid = _bools(metric.get("valid"), n)
    if times is None or l2 is None:
        return None
    if valid is None:
        valid = np.isfinite(l2)
    return Steps(str(record.get("sample_id")), times, l2, valid, _bools(metric.get("coll_stp3"), n),
                 _bools(metric.get("coll_stp3_gt"), n), _bools(metric.get("coll_bev"), n))


def is_full_future(s: Steps) -> bool:
    return all(s.index(t) is not None for t in HORIZONS_S) and s.complete_to(HORIZONS_S[-1])


def _is_partial(s: Steps) -> bool:
    last = HORIZONS_S[-1]
    upto = s.upto(last)
    ends_early = not s.times.size or float(s.times.max()) < last - TIME_TOL_S
    return ends_early or not bool(np.all(s.valid[upto] & np.isfinite(s.l2[upto])))


def _with_avg(per_t: dict[str, float | None]) -> dict[str, float | None]:
    values = [v for v in per_t.values() if v is not None]
    per_t["avg"] = num(np.mean(values)) if values and len(values) == len(per_t) else None
    return per_t


def _l2(full: Sequence[Steps]) -> dict[str, Any]:
    stp3 = {hkey(t): _mean(float(np.mean(s.l2[s.upto(t)])) for s in full) for t in HORIZONS_S}
    uniad = {hkey(t): _mean(s.l2_at(t) for s in full) for t in HORIZONS_S}
    return {"samples": len(full), "stp3_vad": _with_avg(stp3), "uniad": _with_avg(uniad)}


def _collisions(full: Sequence[Steps]) -> dict[str, Any]:
    scored = [s for s in full if s.coll is not None]
    hits: list[tuple[Steps, BoolArray]] = []
    gt_steps = gt_samples = 0
    for s in scored:
        assert s.coll is not None
        gt = s.coll_gt if s.coll_gt is not None else np.zeros_like(s.coll)
        hits.append((s, s.coll & ~gt))
        n_gt = int(np.sum(gt[s.upto(HORIZONS_S[-1])]))
        gt_steps += n_gt
        gt_samples += n_gt > 0
    stp3: dict[str, float | None] = {}
    uniad: dict[str, float | None] = {}
    for t in HORIZONS_S:
        m = _mean(float(np.mean(h[s.upto(t)])) for s, h in hits)
        stp3[hkey(t)] = None if m is None else 100.0 * m
        u = _mean(float(h[i]) for s, h in hits if (i := s.index(t)) is not None)
        uniad[hkey(t)] = None if u is None else 100.0 * u
    bev_scored = [s for s in full if s.bev is not None]
    bev: dict[str, float | None] = {}
    for t in HORIZONS_S:
        b = _mean(float(np.max(s.bev[s.upto(t)])) for s in bev_scored if s.bev is not None)
        bev[hkey(t)] = None if b is None else 100.0 * b
    return {"samples": len(scored), "stp3_vad": _with_avg(stp3), "uniad": _with_avg(uniad),
            "gt_collision_steps": gt_steps, "gt_collision_samples": gt_samples,
            "bev_samples": len(bev_scored), "bev_planner": _with_avg(bev)}


def _ade_fde(all_steps: Sequence[Steps]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for h in ADE_HORIZONS_S:
        ok = [s for s in all_steps if s.complete_to(h)]
        out[hkey(h)] = {"samples": len(ok), "ade": _mean(float(np.mean(s.l2[s.upto(h)])) for s in ok),
                        "fde": _mean(s.l2_at(h) for s in ok)}
    return out


def _rfs(records: Sequence[dict[str, Any]], predictor: str) -> dict[str, Any]:
    entries = [r["metrics"][predictor]["rfs"] for r in records
               if isinstance(((r.get("metrics") or {}).get(predictor) or {}).get("rfs"), dict)]
    entries = [e for e in entries if num(e.get("score")) is not None]
    horizons: dict[str, list[float | None]] = {}
    for e in entries:
        for k, v in (e.get("per_horizon") or {}).items():
            horizons.setdefault(hkey(float(k)), []).append(num(v))
    inside = [bool(e["in_trust_region"]) for e in entries if e.get("in_trust_region") is not None]
    return {"samples": len(entries), "mean": _mean(num(e.get("score")) for e in entries),
            "per_horizon": {k: _mean(v) for k, v in sorted(horizons.items(), key=lambda kv: float(kv[0]))},
            "in_trust_region_pct": 100.0 * sum(inside) / len(inside) if inside else None}


def summarize_predictor(records: Sequence[dict[str, Any]], predictor: str) -> dict[str, Any]:
    """The L2, collision, ADE/FDE and RFS aggregates of one predictor over ``records``."""
    steps = [s for r in records if (s := steps_of(r, predictor)) is not None]
    full = [s for s in steps if is_full_future(s)]
    partial = sum(1 for s in steps if not is_full_future(s) and _is_partial(s))
    return {"scored": len(steps), "full_future": len(full), "excluded_partial_future": partial,
            "excluded_other": len(steps) - len(full) - partial,
            "l2": _l2(full), "collision": _collisions(full), "ade_fde": _ade_fde(steps),
            "rfs": _rfs(records, predictor)}


def _counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_status = {s: sum(1 for r in records if r.get("status") == s) for s in STATUSES}
    attempted = by_status["ok"] + by_status["parse_error"]
    failures = [{"sample_id": str(r.get("sample_id")), "status": r.get("status"), "error": str(r.get("error") or "")}
                for r in records if r.get("status") in ("failed", "parse_error")]
    skipped: dict[str, int] = {}
    for r in records:
        if r.get("status") == "skipped":
            reason = str(r.get("error") or "no reason recorded")
            skipped[reason] = skipped.get(reason, 0) + 1
    return {"total": len(records), **by_status,
            "parse_rate": by_status["ok"] / attempted if attempted else None, "failures": failures,
            "skipped_reasons": dict(sorted(skipped.items(), key=lambda kv: -kv[1]))}


def skipped_line(counts: dict[str, Any], shown: int = 3) -> str | None:
    """``skipped N: reason (k); ...`` with the commonest reasons first, or None when nothing was skipped."""
    reasons = counts.get("skipped_reasons") or {}
    if not reasons:
        return None
    parts = [f"{reason} ({n})" for reason, n in list(reasons.items())[:shown]]
    more = len(reasons) - shown
    tail = f"; and {more} more reason{'s' if more > 1 else ''}" if more > 0 else ""
    return f"skipped {sum(reasons.values())}: " + "; ".join(parts) + tail


def percentiles_and_mean(values: Sequence[float]) -> dict[str, float | None]:
    """``p50``/``p90``/``p99`` (:func:`~blockpilot.eval.metrics.percentiles`) and the mean of the finite values;
    each ``None`` for no values (the JSON a summary writes keeps every key)."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    found = percentiles(arr, PERCENTILES)
    out: dict[str, float | None] = {f"p{p}": num(found.get(f"p{p}")) for p in PERCENTILES}
    out["mean"] = num(arr.mean()) if arr.size else None
    return out


def total_ms(record: dict[str, Any]) -> float | None:
    """The record's total planning time: ``stage_ms["total"]``, or the sum of its stages without one."""
    stages = (record.get("stats") or {}).get("stage_ms") or {}
    if not isinstance(stages, dict) or not stages:
        return None
    if "total" in stages:
        return num(stages["total"])
    values = [num(v) for v in stages.values()]
    return num(sum(v for v in values if v is not None))


def _latency(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    with_stats = [r["stats"] for r in records if isinstance(r.get("stats"), dict)]
    per_stage: dict[str, list[float]] = {}
    for stats in with_stats:
        for stage, ms in (stats.get("stage_ms") or {}).items():
            if (value := num(ms)) is not None:
                per_stage.setdefault(str(stage), []).append(value)
    stages = {stage: {"samples": len(v), **percentiles_and_mean(v)} for stage, v in per_stage.items()}
    return {"samples": len(with_stats), "stages_ms": stages,
            "forwards_per_plan": _mean(num(s.get("forwards")) for s in with_stats),
            "tokens_per_forward": _mean(num(s.get("tokens_per_forward")) for s in with_stats)}


def worst_cases(records: Sequence[dict[str, Any]], limit: int = WORST_CASES) -> list[dict[str, Any]]:
    """Samples with a model score, worst first by the model's L2 at its last valid step."""
    rows: list[tuple[float, dict[str, Any]]] = []
    for r in records:
        s = steps_of(r, "model")
        if s is None or (last := s.last_valid()) is None:
            continue
        cv = steps_of(r, "cv")
        rows.append((float(s.l2[last]), {
            "sample_id": s.sample_id, "status": r.get("status"), "t_last_s": num(s.times[last]),
            "l2_last": num(s.l2[last]), "l2_3s": s.l2_at(3.0), "cv_l2_3s": cv.l2_at(3.0) if cv is not None else None}))
    rows.sort(key=lambda row: (-row[0], row[1]["sample_id"]))
    return [row for _, row in rows[:limit]]


def summarize(records: Sequence[dict[str, Any]], header: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary (JSON-ready: finite floats or ``None``); see the module docstring for conventions."""
    records = list(records)
    # The baseline is scored on exactly the samples the model was scored on, so the two compare like for like.
    paired = [r for r in records if steps_of(r, "model") is not None]
    return {"run": dict(header or {}), "counts": _counts(records),
            "model": summarize_predictor(records, "model"), "cv": summarize_predictor(paired, "cv"),
            "latency": _latency(records), "worst_cases": worst_cases(records)}
