"""Reports and run comparisons from hand-built result records (no planner, no dataset)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from eval_record_fixtures import HEADER, T2, T4, failed, scored, write_run
from PIL import Image

from blockpilot.eval.compare import compare_runs, format_comparison
from blockpilot.eval.plots import BEV_SIZE, L2_SIZE, LATENCY_SIZE, bev_figure
from blockpilot.eval.records import read_results
from blockpilot.eval.report import FAILURES_SHOWN, title_of, write_report
from blockpilot.eval.summary import summarize


def run_records() -> list[dict[str, Any]]:
    return [scored("nus-1", T2, 5.0, (0.5, 0.0), agents=True, total_ms=30.0),
            scored("nus-2", T2, 8.0, (0.0, 2.0), agents=True, total_ms=50.0),
            scored("wod-1", T4, 10.0, (1.0, 0.0), raters=True, total_ms=60.0),
            scored("nus-3", T2, 4.0, (0.0, 0.0), status="parse_error", total_ms=45.0),
            failed("nus-4")]


def test_report_files_and_numbers(tmp_path: Path) -> None:
    results = write_run(tmp_path / "run" / "results.jsonl", run_records())
    out = tmp_path / "report"
    assert write_report(results, out) == out
    md_path = out / "summary.md"
    for name in ("metrics.json", "summary.md", "summary.html", "plots/latency.png", "plots/l2_by_horizon.png"):
        assert (out / name).is_file(), name
    header, records = read_results(results)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summarize(records, header)))
    assert metrics["run"] == HEADER
    assert metrics["counts"]["parse_rate"] == pytest.approx(0.75)
    # nus-2 is off by 2 m everywhere, nus-1 by 0.5 m; wod-1 has no 2 Hz grid but is full-future too
    assert metrics["model"]["l2"]["uniad"]["3"] == pytest.approx((0.5 + 2.0 + 1.0) / 3)

    md = md_path.read_text()
    assert md.startswith("# Evaluation: source nuscenes, decoder fast, checkpoint models/reference")
    for label in ("ST-P3/VAD (average up to t)", "UniAD (at t)", "BEV-Planner", "Constant velocity",
                  "ADE / FDE (m)", "Rater Feedback Score", "Latency (ms)", "Worst cases", "p99"):
        assert label in md, label
    assert "| nus-4 | failed | image missing: samples/CAM_FRONT/x.jpg |" in md
    assert "| nus-3 | parse_error | no waypoints in the answer |" in md
    assert "| Model, UniAD (at t) | 1.17 | 1.17 | 1.17 | 1.17 | 3 |" in md
    assert "| 1 | nus-2 | ok | 2.00 |" in md
    html = (out / "summary.html").read_text()
    assert "<table>" in html and 'src="plots/bev_1.png"' in html and "UniAD (at t)" in html


def test_plots_open_with_expected_sizes(tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(write_run(tmp_path / "results.jsonl", run_records()), out)
    sizes = {"latency.png": LATENCY_SIZE, "l2_by_horizon.png": L2_SIZE}
    bevs = sorted(p.name for p in (out / "plots").glob("bev_*.png"))
    assert bevs == ["bev_1.png", "bev_2.png", "bev_3.png"]  # parse error and failure are not drawn
    sizes.update(dict.fromkeys(bevs, BEV_SIZE))
    for name, size in sizes.items():
        with Image.open(out / "plots" / name) as image:
            image.load()
            assert image.size == size, name
            assert len(image.getcolors(maxcolors=1 << 16) or range(256)) > 3, name  # not blank


def test_bev_draws_raters_and_trust_regions(tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(write_run(tmp_path / "results.jsonl", [scored("wod-1", T4, 10.0, (1.0, 0.0), raters=True)]), out)
    with Image.open(out / "plots" / "bev_1.png") as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert np.any(np.all(pixels == (148, 103, 189), axis=1))  # rater colour


def test_bev_names_route_and_manoeuvre_and_keeps_the_legend_clear() -> None:
    record = scored("nus-2", T2, 8.0, (0.0, 2.0), agents=True)
    record["route_command"] = "turn left"
    record["predictions"]["model"]["behaviour"] = {"longitudinal": "decelerate", "lateral": "turn left"}
    figure = bev_figure(record)
    figure.canvas.draw()
    (view,) = figure.axes
    assert view.get_title() == "nus-2: route turn left, model chose decelerate / turn left"
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "ground truth", "model", "constant velocity", "pedestrian (fades with time)", "vehicle (fades with time)"]
    # the legend lies outside the view, below it, so no agent box or trajectory can be drawn over it
    legend_box, view_box = legend.get_window_extent(), view.get_window_extent()
    assert legend_box.y1 < view_box.y0 and not legend_box.overlaps(view_box)
    assert figure.bbox.contains(legend_box.x0, legend_box.y0) and figure.bbox.contains(legend_box.x1, legend_box.y1)
    assert len(view.patches) == 2 * len(T2) + 1  # two agents per step and the ego box
    del record["predictions"]["model"]  # a plan that did not parse
    assert bev_figure(record).axes[0].get_title() == "nus-2: route turn left, model chose n/a"


def test_rerun_overwrites_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(write_run(tmp_path / "a" / "results.jsonl", run_records()), out)
    write_report(write_run(tmp_path / "b" / "results.jsonl", [scored("only", T2, 5.0, (1.0, 0.0))]), out)
    assert sorted(p.name for p in (out / "plots").glob("bev_*.png")) == ["bev_1.png"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["total"] == 1
    assert "nus-4" not in (out / "summary.md").read_text()


def test_failures_capped_in_text_not_in_json(tmp_path: Path) -> None:
    records = [failed(f"f{i:03d}", error=f"broken {i}") for i in range(FAILURES_SHOWN + 10)]
    out = tmp_path / "report"
    md = (write_report(write_run(tmp_path / "results.jsonl", records, header={}), out) / "summary.md").read_text()
    assert "f049" in md and "f050" not in md and "and 10 more" in md
    assert len(json.loads((out / "metrics.json").read_text())["counts"]["failures"]) == FAILURES_SHOWN + 10
    assert "n/a" in md  # nothing scored
    with Image.open(out / "plots" / "latency.png") as image:
        assert image.size == LATENCY_SIZE


def test_compare_runs_known_delta(tmp_path: Path) -> None:
    a = [scored("s1", T2, 5.0, (0.0, 0.0)), scored("s2", T2, 8.0, (0.0, 0.0), total_ms=20.0),
         scored("s3", T2, 6.0, (0.0, 0.0)), scored("only-a", T2, 6.0, (0.0, 0.0))]
    b = [scored("s1", T2, 5.0, (0.0, 1.0), total_ms=30.0), scored("s2", T2, 8.0, (0.0, -1.0), total_ms=30.0),
         scored("s3", T2, 6.0, (0.0, 0.0), status="parse_error"), failed("only-a")]
    write_run(tmp_path / "A" / "results.jsonl", a)
    b_path = write_run(tmp_path / "B" / "results.jsonl", b)
    cmp = compare_runs(tmp_path / "A", b_path, out_dir=tmp_path / "cmp")
    assert cmp["common"] == 3 and cmp["model_paired"] == 2
    assert (cmp["a"]["dropped"], cmp["a"]["dropped_not_in_other"]) == (1, 1)
    assert (cmp["b"]["dropped"], cmp["b"]["dropped_unscored"]) == (1, 1)
    rows = {r["metric"]: r for r in cmp["rows"]}
    for key in ("L2 (m) ST-P3/VAD avg to 1 s", "L2 (m) UniAD at 3 s", "L2 (m) UniAD Avg. of 1-3 s", "ADE (m) 3 s"):
        assert rows[key]["a"] == pytest.approx(0.0) and rows[key]["delta"] == pytest.approx(1.0), key
        assert rows[key]["rel_pct"] is None  # relative to zero
    assert rows["FDE (m) 5 s"]["delta"] is None
    assert rows["Parse rate (%)"]["a"] == pytest.approx(100.0)
    assert rows["Parse rate (%)"]["b"] == pytest.approx(200 / 3)
    assert rows["Latency total p50 (ms)"]["delta"] == pytest.approx(-10.0)  # A: 20, 40, 40 -> 40; B: 30
    assert rows["Latency total p50 (ms)"]["rel_pct"] == pytest.approx(-25.0)
    text = format_comparison(cmp)
    assert "| L2 (m) UniAD at 3 s | 0.00 | 1.00 | +1.00 | n/a |" in text
    assert "Compared on 3 samples" in text
    assert (tmp_path / "cmp" / "compare.md").read_text() == text
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(cmp["rows"]))
    assert all(v is None or math.isfinite(v) for r in saved["rows"] for v in (r["a"], r["b"], r["delta"]))


def test_compare_names_a_run_without_results(tmp_path: Path) -> None:
    write_run(tmp_path / "A" / "results.jsonl", [scored("s1", T2, 5.0, (0.0, 0.0))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        compare_runs(tmp_path / "A", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"missing\.jsonl"):
        compare_runs(tmp_path / "missing.jsonl", tmp_path / "A")


def test_title_reads_the_cli_header() -> None:
    header = {"source": {"name": "nuscenes", "version": "v1.0-mini"}, "checkpoint": "/models/reference",
              "decoder": {"name": "block", "threshold": 0.9}}
    assert title_of(header, []) == "Evaluation: source nuscenes, decoder block, checkpoint /models/reference"
    assert title_of({}, [{"source": "wod"}]) == "Evaluation: source wod, decoder n/a, checkpoint n/a"


def test_skipped_samples_say_why_in_metrics_report_and_summary_line(tmp_path: Path) -> None:
    from blockpilot.eval.summary import skipped_line

    history = "needs 2.0 s of history (the scene has 0 earlier keyframes)"
    records = [{**failed(f"s{i}", error=history), "status": "skipped"} for i in range(3)]
    records += [{**failed("s9", error="no CAM_FRONT frame"), "status": "skipped"}, *run_records()]
    out = tmp_path / "report"
    md = (write_report(write_run(tmp_path / "results.jsonl", records), out) / "summary.md").read_text()
    counts = json.loads((out / "metrics.json").read_text())["counts"]
    assert counts["skipped"] == 4 and counts["skipped_reasons"] == {history: 3, "no CAM_FRONT frame": 1}
    assert "Skipped (4)" in md and history in md
    assert skipped_line(counts) == f"skipped 4: {history} (3); no CAM_FRONT frame (1)"
    assert skipped_line({**counts, "skipped_reasons": {}}) is None
    assert skipped_line(counts, shown=1) == f"skipped 4: {history} (3); and 1 more reason"
