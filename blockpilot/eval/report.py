"""A run's report: ``metrics.json`` (the summary), ``summary.md`` and ``summary.html`` (the same
content; the HTML is self-contained apart from the PNGs it links relatively) and ``plots/*.png``.

Every file is written atomically (:func:`~blockpilot.atomic_io.atomic_write`), so a
rerun overwrites a report cleanly and a reader never sees half a file.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from .plots import write_plots
from .records import read_results
from .summary import ADE_HORIZONS_S, HORIZONS_S, PREDICTORS, hkey, summarize

FAILURES_SHOWN = 50
PREDICTOR_NAMES = {"model": "Model", "cv": "Constant velocity"}

# A document is a list of blocks: ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", alt, src),
# rendered identically to Markdown and HTML.
Block = tuple[Any, ...]


def fmt(value: Any) -> str:
    """Two decimals for floats, integers as they are, ``n/a`` for ``None``."""
    if value is None:
        return "n/a"
    if isinstance(value, int):  # bool included
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(str(block[1]))
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("\n".join(["| " + " | ".join(_md_cell(h) for h in headers) + " |",
                                  "|" + "|".join("---" for _ in headers) + "|",
                                  *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)]))
        elif kind == "img":
            out.append(f"![{block[1]}]({block[2]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(str(block[1]))}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(fmt(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(block[2])}" alt="{html.escape(block[1])}"></p>')
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
             "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th:first-child,td:first-child"
             "{text-align:left}thead{background:#eee}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _name(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("name") or value.get("kind") or value.get("dataroot")
    return "n/a" if value in (None, "") else str(value)


def title_of(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    source = header.get("source") or header.get("dataset")
    if not source:  # fall back on the records' own source names
        source = ", ".join(sorted({str(r["source"]) for r in records if r.get("source")}))
    source = _name(source)
    return (f"Evaluation: source {source}, decoder {_name(header.get('decoder'))}, "
            f"checkpoint {_name(header.get('checkpoint'))}")


def _settings_rows(header: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for key, value in header.items():
        if isinstance(value, dict):
            rows += [[f"{key}.{k}", json.dumps(v) if isinstance(v, list | dict) else v] for k, v in value.items()]
        else:
            rows.append([key, json.dumps(value) if isinstance(value, list) else value])
    return rows


def _per_t(values: dict[str, Any]) -> list[Any]:
    return [values[hkey(t)] for t in HORIZONS_S] + [values["avg"]]


def report_blocks(summary: dict[str, Any], title: str, plots: dict[str, Any] | None = None,
                  plots_rel: str = "plots") -> list[Block]:
    """The report's content as blocks (see :func:`to_markdown` and :func:`to_html`)."""
    preds, counts, lat = {p: summary[p] for p in PREDICTORS}, summary["counts"], summary["latency"]
    horizons = [f"{t:g} s" for t in HORIZONS_S] + ["Avg."]
    blocks: list[Block] = [("h1", title)]
    if summary["run"]:
        blocks += [("h2", "Run settings"), ("table", ["setting", "value"], _settings_rows(summary["run"]))]
    st = counts
    blocks += [("h2", "Samples"),
               ("table", ["records", "ok", "parse_error", "failed", "skipped", "parse rate (%)"],
                [[counts["total"], st["ok"], st["parse_error"], st["failed"], st["skipped"],
                  None if counts["parse_rate"] is None else 100.0 * counts["parse_rate"]]]),
               ("p", "Parse rate = ok / (ok + parse_error). L2 and collisions use full-future samples only (every "
                     "step up to 3 s valid, with steps at 1, 2 and 3 s), as ST-P3 and VAD do."),
               ("table", ["predictor", "scored", "full-future", "excluded: partial future", "excluded: other grid"],
                [[PREDICTOR_NAMES[p], preds[p]["scored"], preds[p]["full_future"],
                  preds[p]["excluded_partial_future"], preds[p]["excluded_other"]] for p in PREDICTORS])]
    l2_rows = [[f"{PREDICTOR_NAMES[p]}, {label}", *_per_t(preds[p]["l2"][conv]), preds[p]["l2"]["samples"]]
               for conv, label in (("stp3_vad", "ST-P3/VAD (average up to t)"), ("uniad", "UniAD (at t)"))
               for p in PREDICTORS]
    blocks += [("h2", "L2 (m)"), ("table", ["predictor, convention", *horizons, "samples"], l2_rows),
               ("p", "ST-P3/VAD: per sample the mean L2 over the steps up to t, then the mean over samples. "
                     "UniAD: the L2 at the step at t. Avg. is the mean of the 1, 2 and 3 s columns.")]
    coll_rows = []
    for conv, label, n_key in (("stp3_vad", "ST-P3/VAD (average up to t)", "samples"),
                               ("uniad", "UniAD (at t)", "samples"), ("bev_planner", "BEV-Planner", "bev_samples")):
        coll_rows += [[f"{PREDICTOR_NAMES[p]}, {label}", *_per_t(preds[p]["collision"][conv]),
                       preds[p]["collision"][n_key]] for p in PREDICTORS]
    mc = preds["model"]["collision"]
    blocks += [("h2", "Collision rate (%)"), ("table", ["predictor, convention", *horizons, "samples"], coll_rows),
               ("p", "ST-P3/VAD and UniAD: a step counts when the plan collides and the ground truth does not "
                     f"(the ground truth itself collides on {mc['gt_collision_steps']} steps in "
                     f"{mc['gt_collision_samples']} samples). BEV-Planner: any collision up to t, "
                     "footprint turned to the heading, nothing excluded.")]
    ade_rows = [[PREDICTOR_NAMES[p], *(preds[p]["ade_fde"][hkey(h)][k] for h in ADE_HORIZONS_S
                                       for k in ("ade", "fde", "samples"))] for p in PREDICTORS]
    blocks += [("h2", "ADE / FDE (m)"),
               ("table", ["predictor", *(f"{k} {h:g} s" for h in ADE_HORIZONS_S for k in ("ADE", "FDE", "samples"))],
                ade_rows),
               ("p", "On samples whose future is valid up to the horizon and has a step at it.")]
    if any(preds[p]["rfs"]["samples"] for p in PREDICTORS):
        rfs_h = sorted({k for p in PREDICTORS for k in preds[p]["rfs"]["per_horizon"]}, key=float)
        blocks += [("h2", "Rater Feedback Score (WOD-E2E)"),
                   ("table", ["predictor", "RFS", *(f"at {h} s" for h in rfs_h), "in trust region (%)", "samples"],
                    [[PREDICTOR_NAMES[p], preds[p]["rfs"]["mean"], *(preds[p]["rfs"]["per_horizon"].get(h)
                                                                     for h in rfs_h),
                      preds[p]["rfs"]["in_trust_region_pct"], preds[p]["rfs"]["samples"]] for p in PREDICTORS])]
    blocks += [("h2", "Latency (ms)"),
               ("table", ["stage", "samples", "mean", "p50", "p90", "p99"],
                [[stage, v["samples"], v["mean"], v["p50"], v["p90"], v["p99"]]
                 for stage, v in lat["stages_ms"].items()]),
               ("p", f"Over {lat['samples']} plans with stats: {fmt(lat['forwards_per_plan'])} forwards per plan, "
                     f"{fmt(lat['tokens_per_forward'])} tokens per forward.")]
    if plots:
        blocks += [("img", "latency histogram", f"{plots_rel}/{plots['latency'].name}"),
                   ("img", "L2 by horizon", f"{plots_rel}/{plots['l2_by_horizon'].name}")]
    failures = counts["failures"]
    blocks += [("h2", f"Failures ({len(failures)})")]
    if failures:
        blocks.append(("table", ["sample", "status", "error"],
                       [[f["sample_id"], f["status"], f["error"]] for f in failures[:FAILURES_SHOWN]]))
        if len(failures) > FAILURES_SHOWN:
            blocks.append(("p", f"... and {len(failures) - FAILURES_SHOWN} more (all in metrics.json)."))
    else:
        blocks.append(("p", "None."))
    skipped = counts.get("skipped_reasons") or {}
    if skipped:
        blocks += [("h2", f"Skipped ({sum(skipped.values())})"),
                   ("table", ["reason", "samples"], [[reason, n] for reason, n in skipped.items()])]
    worst = summary["worst_cases"]
    blocks += [("h2", "Worst cases"),
               ("table", ["rank", "sample", "status", "model L2@3s", "cv L2@3s", "model L2 at last valid step",
                          "last valid step (s)"],
                [[i + 1, w["sample_id"], w["status"], w["l2_3s"], w["cv_l2_3s"], w["l2_last"], w["t_last_s"]]
                 for i, w in enumerate(worst)]),
               ("p", "Ranked by the model's L2 at its last valid step.")]
    for sample_id, path in (plots or {}).get("bev", []):
        blocks.append(("img", f"bird's-eye view of {sample_id}", f"{plots_rel}/{path.name}"))
    return blocks


def write_report(results_path: str | Path, out_dir: str | Path) -> Path:
    """Summarize a results file into ``out_dir`` (metrics.json, summary.md, summary.html, plots/*.png);
    returns ``out_dir``."""
    header, records = read_results(results_path)
    summary = summarize(records, header)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(records, summary, out / "plots")
    title = title_of(header or {}, records)
    blocks = report_blocks(summary, title, plots)
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    atomic_write(out / "summary.html", to_html(blocks, title))
    atomic_write(out / "summary.md", to_markdown(blocks))
    return out
