"""Scores of a robot replay (:mod:`blockpilot.eval.robot_eval`) and its ``summary.md``.

Per predictor (``model``, ``baseline``: repeat-last-action), over the chunk rows that are not padding
(LeRobot's ``action_is_pad``: past the episode's end):

- ``l1`` / ``mse``: the mean absolute / squared error, overall, per action dimension and per chunk step;
- ``paired``: both predictors' mean L1 and gripper accuracy on the samples both scored (the model parsed and the
  baseline had a previous action), and the model's L1 reduction against the baseline (``1 - model / baseline``);
- ``gripper_accuracy``: the share of rows where the predicted gripper is on the same side of the threshold as the
  target (``value > threshold`` is one state, the rest the other; which side is "closed" depends on the robot,
  the accuracy does not). The threshold is the midpoint of the dataset's gripper action min and max
  (``meta/stats.json``), 0.5 without statistics.

Counts: samples, ``ok`` / ``parse_error`` / ``failed`` (each failure with its reason), the parse rate over the
planned samples, and latency percentiles of the planner's total time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .summary import percentiles_and_mean, total_ms

PREDICTORS = ("model", "baseline")


def _round(x: float) -> float:
    return float(round(float(x), 6))


def score(records: Sequence[dict[str, Any]], key: str, dims: Sequence[str],
          threshold: float | None) -> dict[str, Any]:
    """L1, MSE (overall, per dim, per step) and gripper accuracy of ``record[key]`` against ``record["target"]``."""
    errors, masks, preds, targets = [], [], [], []
    for r in records:
        if r.get(key) is None:
            continue
        pred, target = np.asarray(r[key], np.float64), np.asarray(r["target"], np.float64)
        errors.append(pred - target)
        masks.append(~np.asarray(r["pad"], bool))
        preds.append(pred)
        targets.append(target)
    out: dict[str, Any] = {"samples": len(errors), "rows": 0, "l1": None, "mse": None, "gripper_accuracy": None}
    if not errors:
        return out
    err, valid = np.stack(errors), np.stack(masks)  # (n, K, D), (n, K)
    rows = err[valid]  # (rows, D)
    out["rows"] = len(rows)
    if not len(rows):
        return out
    for name, f in (("l1", np.abs), ("mse", np.square)):
        per_step = {str(k): (_round(f(err[:, k][valid[:, k]]).mean()) if valid[:, k].any() else None)
                    for k in range(err.shape[1])}
        out[name] = {"mean": _round(f(rows).mean()),
                     "per_dim": {d: _round(f(rows[:, i]).mean()) for i, d in enumerate(dims)},
                     "per_step": per_step}
    if threshold is not None:
        g = list(dims).index("gripper")
        pred_g, target_g = np.stack(preds)[valid][:, g], np.stack(targets)[valid][:, g]
        out["gripper_accuracy"] = _round(((pred_g > threshold) == (target_g > threshold)).mean())
    return out


def robot_metrics(records: Sequence[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """The run's ``metrics.json`` content."""
    statuses = [r["status"] for r in records]
    ok, parse_error, failed = (statuses.count(s) for s in ("ok", "parse_error", "failed"))
    planned = ok + parse_error
    counts = {"total": len(records), "ok": ok, "parse_error": parse_error, "failed": failed,
              "parse_rate": _round(ok / planned) if planned else None,
              "baseline_skipped_first_frames": sum(1 for r in records if "target" in r and r.get("baseline") is None),
              "failures": [{"index": r["index"], "status": r["status"], "error": r["error"]}
                           for r in records if r["status"] != "ok"]}
    totals = [v for r in records if (v := total_ms(r)) is not None]
    threshold = facts.get("gripper_threshold")
    both = [r for r in records if r.get("pred") is not None and r.get("baseline") is not None]
    paired = {who: score(both, "pred" if who == "model" else who, facts["dims"], threshold) for who in PREDICTORS}
    l1s = [(paired[who].get("l1") or {}).get("mean") for who in PREDICTORS]
    return {"kind": "robot", **facts,
            "gripper_rule": None if threshold is None else f"state = value > {threshold:g} (midpoint of the "
                                                           "dataset's gripper action range)",
            "counts": counts, "latency_ms": {"samples": len(totals), **percentiles_and_mean(totals)},
            **{who: score(records, "pred" if who == "model" else who, facts["dims"], threshold)
               for who in PREDICTORS},
            "paired": {"samples": len(both), "model_l1": l1s[0], "baseline_l1": l1s[1],
                       "l1_reduction": _round(1 - l1s[0] / l1s[1]) if l1s[0] is not None and l1s[1] else None,
                       "model_gripper_accuracy": paired["model"]["gripper_accuracy"],
                       "baseline_gripper_accuracy": paired["baseline"]["gripper_accuracy"]}}


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.4f}"


def _table(metrics: dict[str, Any], metric: str, part: str, labels: Sequence[str]) -> list[str]:
    lines = [f"| {part} | model {metric} | repeat-last-action {metric} |", "|---|---|---|"]
    for label in labels:
        cells = [((metrics[who].get(metric) or {}).get(part) or {}).get(label) for who in PREDICTORS]
        lines.append(f"| {label} | {_fmt(cells[0])} | {_fmt(cells[1])} |")
    return lines


def headline(metrics: dict[str, Any]) -> str:
    """One line, on the samples both predictors scored (``paired``)."""
    p, c, lat = metrics["paired"], metrics["counts"], metrics["latency_ms"]
    l1 = [p["model_l1"], p["baseline_l1"]]
    grip = [p["model_gripper_accuracy"], p["baseline_gripper_accuracy"]]
    return (f"on {p['samples']} paired samples: action L1 model {_fmt(l1[0])} vs repeat-last-action {_fmt(l1[1])} "
            f"(reduction {_fmt(p['l1_reduction'], True)}); gripper accuracy "
            f"{_fmt(grip[0], True)} vs {_fmt(grip[1], True)}; parsed {_fmt(c['parse_rate'], True)} of "
            f"{c['ok'] + c['parse_error']} planned; latency p50 {_fmt(lat.get('p50'))} ms")


def summary_markdown(metrics: dict[str, Any], plots: Sequence[str] = ()) -> str:
    dims, steps = metrics["dims"], [str(k) for k in range(metrics["steps"])]
    c, lat = metrics["counts"], metrics["latency_ms"]
    lines = ["# Robot replay", "", headline(metrics), "",
             f"Schema: {metrics['action']} ({', '.join(dims)}), {metrics['steps']} steps. Padded chunk rows are "
             "excluded. Baseline: repeat-last-action (the episode's previous action for every step; first frames "
             f"skipped: {c['baseline_skipped_first_frames']}).",
             f"Gripper rule: {metrics['gripper_rule'] or 'no gripper dim'}.", "",
             f"Samples {c['total']}: ok {c['ok']}, parse_error {c['parse_error']}, failed {c['failed']}. "
             f"Latency ms p50/p90/p99: {_fmt(lat.get('p50'))}/{_fmt(lat.get('p90'))}/{_fmt(lat.get('p99'))}.", ""]
    for metric in ("l1", "mse"):
        lines += ["", *_table(metrics, metric, "per_dim", dims), "", *_table(metrics, metric, "per_step", steps)]
    lines += [""] + [f"![{name}](plots/{name})" for name in plots]
    if c["failures"]:
        lines += ["", "## Not scored", ""] + [f"- sample {f['index']} ({f['status']}): {f['error']}"
                                              for f in c["failures"][:20]]
    return "\n".join(lines) + "\n"
