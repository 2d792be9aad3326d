"""Two planners driving the same closed-loop seeds, compared episode by episode.

The closed-loop scores of one episode vary a lot from seed to seed (a junction turn against a straight road), so
two builds are compared on their *paired* differences: per seed, the candidate's PDMS (and Bench2Drive driving
score) minus the reference's, with the mean and a 95 % percentile-bootstrap interval of that mean (resampling the
seeds; a fixed generator seed, so the interval is the same run after run). An episode a policy failed (a backend
error) scores 0, as in :func:`~blockpilot.eval.drive_closed_loop.policy_summary`; a seed either policy has no record
for is left out of the pairs. ``eval --closed-loop --world driving --compare-bundle`` reports it in ``summary.json``
(``paired``) and the report; the closed-loop quality gate (:mod:`blockpilot.quant.gate`) decides on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PAIRED_SCORES = (("pdms", "pdm", "pdms"), ("driving_score", "driving", "driving_score"))
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def episode_score(record: dict[str, Any], group: str, key: str) -> float:
    """One episode's score (0 for a failed episode)."""
    return float(record[group][key]) if record["status"] == "ok" else 0.0


def bootstrap_mean_ci(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean of ``values`` (None for fewer than two values)."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = x[rng.integers(0, x.size, size=(BOOTSTRAP_RESAMPLES, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def paired_difference(records: Sequence[dict[str, Any]], reference: str, candidate: str) -> dict[str, Any]:
    """``candidate`` minus ``reference`` per seed both drove: for PDMS and the driving score, the mean of each
    policy over those seeds, the mean difference, its bootstrap 95 % interval, the standard deviation and the
    per-seed differences (a negative difference: the candidate drove worse)."""
    by = {(r["policy"], r["seed"]): r for r in records}
    seeds = sorted(s for p, s in by if p == reference and (candidate, s) in by)
    out: dict[str, Any] = {"reference": reference, "candidate": candidate, "episodes": len(seeds), "seeds": seeds}
    for name, group, key in PAIRED_SCORES:
        a = [episode_score(by[(reference, s)], group, key) for s in seeds]
        b = [episode_score(by[(candidate, s)], group, key) for s in seeds]
        diff = [y - x for x, y in zip(a, b, strict=True)]
        ci = bootstrap_mean_ci(diff)
        out[name] = {"reference_mean": float(np.mean(a)) if seeds else None,
                     "candidate_mean": float(np.mean(b)) if seeds else None,
                     "mean_diff": float(np.mean(diff)) if seeds else None,
                     "ci95": list(ci) if ci else None,
                     "sd_diff": float(np.std(diff, ddof=1)) if len(diff) > 1 else None,
                     "per_seed": dict(zip((str(s) for s in seeds), diff, strict=True))}
    return out


def paired_text(paired: dict[str, Any]) -> str:
    """One line per score for a terminal."""
    lines = []
    for name, _, _ in PAIRED_SCORES:
        p = paired[name]
        if p["mean_diff"] is None:
            lines.append(f"{name}: no seed driven by both {paired['reference']} and {paired['candidate']}")
            continue
        ci = "" if p["ci95"] is None else f" (95 % CI {p['ci95'][0]:+.3f}..{p['ci95'][1]:+.3f})"
        lines.append(f"{paired['candidate']} - {paired['reference']} {name}: {p['mean_diff']:+.3f}{ci} over "
                     f"{paired['episodes']} paired episodes ({p['reference_mean']:.3f} -> {p['candidate_mean']:.3f})")
    return "\n".join(lines)
