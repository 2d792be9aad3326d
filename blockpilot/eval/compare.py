"""Side-by-side comparison of two runs (A and B) on the samples both of them scored.

A sample counts as scored when its record's status is ``ok`` or ``parse_error`` (the planner ran and
answered). Both runs are summarized on the sample ids scored in both; the model's metrics are further
paired, kept only for ids whose plan parsed in both runs, so L2 and collisions compare the same
samples, while the parse rate still counts every common sample. Deltas are B - A, and relative to A
in percent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from ..errors import BlockpilotError
from .records import read_results
from .report import fmt
from .summary import ADE_HORIZONS_S, HORIZONS_S, hkey, num, summarize

RESULTS_NAME = "results.jsonl"
SCORED = ("ok", "parse_error")


class CompareError(BlockpilotError, ValueError):
    """Two runs that cannot be compared: one is missing, or they scored no sample in common. ``blockpilot eval
    compare`` exits 1 (like a failed check), not 2: the invocation was fine, the runs hold nothing to compare."""

    exit_code = 1


def resolve_results(path: str | Path) -> Path:
    """The results file of a run directory (``results.jsonl`` in it) or the file itself."""
    p = Path(path)
    if p.is_dir():
        if not (p / RESULTS_NAME).is_file():
            raise CompareError(f"{p}: run directory has no {RESULTS_NAME}")
        return p / RESULTS_NAME
    if not p.is_file():
        raise CompareError(f"{p}: no such results file or run directory")
    return p


def _by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["sample_id"]): r for r in records if r.get("status") in SCORED}


def _has_model(record: dict[str, Any]) -> bool:
    return isinstance((record.get("metrics") or {}).get("model"), dict)


def _without_model(record: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in (record.get("metrics") or {}).items() if k != "model"}
    return {**record, "metrics": metrics}


def _row(metric: str, a: Any, b: Any) -> dict[str, Any]:
    a, b = num(a), num(b)
    delta = b - a if a is not None and b is not None else None
    rel = 100.0 * delta / abs(a) if delta is not None and a else None
    return {"metric": metric, "a": a, "b": b, "delta": delta, "rel_pct": rel}


def _rows(sa: dict[str, Any], sb: dict[str, Any]) -> list[dict[str, Any]]:
    ma, mb = sa["model"], sb["model"]
    keys = [hkey(t) for t in HORIZONS_S] + ["avg"]
    rows: list[dict[str, Any]] = []

    def name(label: str, k: str) -> str:
        return f"{label.split(' ')[0]} Avg. of 1-3 s" if k == "avg" else f"{label} {k} s"

    for conv, label in (("stp3_vad", "ST-P3/VAD avg to"), ("uniad", "UniAD at")):
        rows += [_row(f"L2 (m) {name(label, k)}", ma["l2"][conv][k], mb["l2"][conv][k]) for k in keys]
    for conv, label in (("stp3_vad", "ST-P3/VAD avg to"), ("uniad", "UniAD at"), ("bev_planner", "BEV-Planner to")):
        rows += [_row(f"Collision (%) {name(label, k)}", ma["collision"][conv][k], mb["collision"][conv][k])
                 for k in keys]
    for h in ADE_HORIZONS_S:
        for k in ("ade", "fde"):
            rows.append(_row(f"{k.upper()} (m) {h:g} s", ma["ade_fde"][hkey(h)][k], mb["ade_fde"][hkey(h)][k]))
    rows.append(_row("RFS", ma["rfs"]["mean"], mb["rfs"]["mean"]))
    pa, pb = sa["counts"]["parse_rate"], sb["counts"]["parse_rate"]
    rows.append(_row("Parse rate (%)", None if pa is None else 100 * pa, None if pb is None else 100 * pb))
    la, lb = sa["latency"], sb["latency"]
    stages = list(la["stages_ms"]) + [s for s in lb["stages_ms"] if s not in la["stages_ms"]]
    for stage in stages:
        for p in ("p50", "p90"):
            rows.append(_row(f"Latency {stage} {p} (ms)", la["stages_ms"].get(stage, {}).get(p),
                             lb["stages_ms"].get(stage, {}).get(p)))
    rows.append(_row("Forwards per plan", la["forwards_per_plan"], lb["forwards_per_plan"]))
    rows.append(_row("Tokens per forward", la["tokens_per_forward"], lb["tokens_per_forward"]))
    return rows


def compare_runs(a_dir_or_results: str | Path, b_dir_or_results: str | Path,
                 out_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare run B against run A on their common scored samples; with ``out_dir``, also write
    ``compare.md`` and ``compare.json`` there. Raises :class:`CompareError` naming a run without results, or when
    the runs scored no sample in common."""
    paths = resolve_results(a_dir_or_results), resolve_results(b_dir_or_results)
    (ha, ra), (hb, rb) = read_results(paths[0]), read_results(paths[1])
    ia, ib = _by_id(ra), _by_id(rb)
    common = [sid for sid in ia if sid in ib]
    if not common:
        raise CompareError(f"{paths[0]} ({len(ia)} scored of {len(ra)}) and {paths[1]} ({len(ib)} scored of "
                           f"{len(rb)}) have no scored sample in common: nothing to compare")
    paired = {sid for sid in common if _has_model(ia[sid]) and _has_model(ib[sid])}

    def subset(by_id: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [by_id[sid] if sid in paired else _without_model(by_id[sid]) for sid in common]

    sa, sb = summarize(subset(ia), ha), summarize(subset(ib), hb)

    def run_info(path: Path, records: list[dict[str, Any]], scored: dict[str, Any],
                 other: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        return {"path": str(path), "records": len(records), "scored": len(scored),
                "dropped": len(records) - len(common),
                "dropped_unscored": len(records) - len(scored),
                "dropped_not_in_other": sum(1 for sid in scored if sid not in other),
                "run": summary["run"]}

    cmp = {"a": run_info(paths[0], ra, ia, ib, sa), "b": run_info(paths[1], rb, ib, ia, sb),
           "common": len(common), "model_paired": len(paired), "rows": _rows(sa, sb),
           "summaries": {"a": sa, "b": sb}}
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write(out / "compare.json", json.dumps(cmp, indent=2, allow_nan=False) + "\n")
        atomic_write(out / "compare.md", format_comparison(cmp))
    return cmp


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def format_comparison(cmp: dict[str, Any]) -> str:
    """The comparison as Markdown: what was compared, then metric | A | B | B - A | rel. %."""
    lines = ["# Run comparison (B against A)", ""]
    for key in ("a", "b"):
        run = cmp[key]
        lines.append(f"- {key.upper()}: `{run['path']}`: {run['records']} records, {run['scored']} scored; dropped "
                     f"{run['dropped']} ({run['dropped_unscored']} not scored, {run['dropped_not_in_other']} "
                     "scored here but not in the other run)")
    lines += ["", f"Compared on {cmp['common']} samples scored in both runs; the model's metrics on the "
                  f"{cmp['model_paired']} of them whose plan parsed in both. Deltas are B - A.", "",
              "| metric | A | B | B - A | rel. (%) |", "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {fmt(r['a'])} | {fmt(r['b'])} | {_signed(r['delta'])} | {_signed(r['rel_pct'])} |"
              for r in cmp["rows"]]
    return "\n".join(lines) + "\n"
