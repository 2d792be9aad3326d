"""``blockpilot bench scale``: the tiny shape's checkpoint in the hub layout, the stage runner's records (time,
peak RSS, exit code, errors, timeouts) and a short run of the CLI with external data forced on. The full stage
list runs in benchmarks (it takes minutes even at the tiny shape); nothing here asserts on a time."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from blockpilot.bench.published import IM_END_ID, MASK_ID
from blockpilot.bench.scale import ScaleBenchError, run_stage
from blockpilot.bench.scale_shapes import SCALE_SHAPES, tensor_shapes, write_checkpoint
from blockpilot.cli import main

STATUSES = {"passed", "failed", "timeout", "skipped"}


def test_published_shapes_have_the_published_parameter_counts() -> None:
    def count(name: str) -> int:
        total = 0
        for _, dims in tensor_shapes(SCALE_SHAPES[name]):
            n = 1
            for d in dims:
                n *= d
            total += n
        return total

    # Qwen2.5-1.5B-Instruct 1,543,714,304; Qwen2.5-7B-Instruct 7,615,616,512; Qwen2.5-VL-3B 3,754,622,976.
    assert count("1.5b") == 1_543_714_304
    assert count("7b") == 7_615_616_512
    assert count("3b") == 3_754_622_976
    assert 20e6 < count("tiny") < 100e6


def test_tiny_checkpoint_is_in_the_hub_layout_and_loads(tmp_path: Path) -> None:
    from safetensors import safe_open

    from blockpilot.vla.hf_config import load_config
    from blockpilot.vla.loader import load_model

    written = write_checkpoint(SCALE_SHAPES["tiny"], tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == written.weight_bytes == 2 * written.parameters
    names = {n for n, _ in tensor_shapes(SCALE_SHAPES["tiny"])}
    assert set(index["weight_map"]) == names and "lm_head.weight" not in names  # tied: stored once
    for file in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "ckpt" / file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                assert str(f.get_slice(key).get_dtype()) == "BF16"
    config = load_config(tmp_path / "ckpt")
    assert (config.tokens.mask, config.tokens.end, config.lm.hidden_size) == (MASK_ID, IM_END_ID, 256)
    model = load_model(tmp_path / "ckpt")
    assert sum(p.numel() for p in model.parameters()) == written.parameters
    with pytest.raises(Exception, match="already exists"):
        write_checkpoint(SCALE_SHAPES["tiny"], tmp_path / "ckpt")


def test_stage_runner_records_rss_exit_code_and_timeouts() -> None:
    env = dict(os.environ)
    alloc = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    rc, wall, rss, out, timed_out = run_stage([sys.executable, "-c", alloc], 60, env)
    assert (rc, timed_out, out.strip()) == (0, False, "ok") and rss >= 300 * 2**20 and wall > 0
    rc, _, _, out, timed_out = run_stage([sys.executable, "-c", "import sys; print('boom'); sys.exit(7)"], 60, env)
    assert (rc, timed_out) == (7, False) and "boom" in out
    rc, wall, _, _, timed_out = run_stage([sys.executable, "-c", "import time; time.sleep(30)"], 1.0, env)
    assert timed_out and rc is not None and rc < 0 and wall < 20


def test_bad_stage_names_are_refused() -> None:
    from blockpilot.bench.scale_cli import run
    from blockpilot.cli import build_parser

    args = build_parser().parse_args(["bench", "scale", "--shape", "tiny", "--stages", "load,nope"])
    with pytest.raises(ScaleBenchError, match="nope"):
        run(args)


def _check_report(report: dict[str, Any], text: str, stages: list[str]) -> None:
    assert report["shape"] == "tiny" and report["weight_bytes"] == 2 * report["parameters"]
    assert report["machine"]["cpu_count"] == os.cpu_count() and report["machine"]["ram_bytes"] > 0
    assert report["versions"]["torch"] and report["settings"]["force_external_data"] is True
    assert [s["name"] for s in report["stages"]] == ["write", *stages]
    for s in report["stages"]:
        assert s["status"] in STATUSES
        if s["status"] == "skipped":
            assert s["error"]
            continue
        assert s["wall_s"] > 0 and s["peak_rss_bytes"] > 0
        assert s["rss_x_weights"] == pytest.approx(s["peak_rss_bytes"] / report["weight_bytes"], abs=0.01)
        if s["status"] != "passed":
            assert s["error"] and s["rc"] != 0  # a failure is recorded with its reason
        assert f"| {s['name']}" in text
    assert report["stages"][0]["status"] == "passed"


def test_scale_cli_tiny_with_external_data(tmp_path: Path) -> None:
    stages = ["export", "inspect", "plan-ort"]  # the load is checked above; the whole list runs in benchmarks
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["bench", "scale", "--shape", "tiny", "--stages", ",".join(stages), "--plan-steps", "1",
                   "--force-external-data", "--timeout", "300", "--work", str(tmp_path / "work"),
                   "--results", str(tmp_path / "results")])
    files = sorted((tmp_path / "results").iterdir())
    assert [f.suffix for f in files] == [".json", ".txt"] and files[0].stem.startswith("scale_tiny_")
    report = json.loads(files[0].read_text())
    _check_report(report, files[1].read_text(), stages)
    # With the large-model paths forced on (every initializer in the graphs' data files), each stage passes.
    assert rc == 0 and all(s["status"] == "passed" for s in report["stages"]), report["stages"]
    assert "peak RSS" in buffer.getvalue() and not (tmp_path / "work").exists()
    assert {s["name"]: s for s in report["stages"]}["plan-ort"]["details"]["steps"] == 1
    # Result files are committed: no interpreter path, environment or scratch directory of this machine in them.
    text = files[0].read_text() + files[1].read_text()
    leaks = [text[max(0, text.find(p) - 80):text.find(p) + 40] for p in (sys.executable, str(tmp_path)) if p in text]
    assert not leaks and "<work>/checkpoint" in text, leaks


def test_result_files_are_named_by_shape_and_date(tmp_path: Path) -> None:
    from blockpilot.bench.scale import ScaleReport
    from blockpilot.bench.scale_cli import write_scale

    report = ScaleReport("0.5b", "x", "2026-01-02", {"cpu": "c", "cpu_count": 2, "ram_bytes": 2**30, "device": "cpu"},
                         {"torch": "2"}, {}, {})
    js, txt = write_scale(report, tmp_path)
    assert (js.name, txt.name) == ("scale_0.5b_2026-01-02.json", "scale_0.5b_2026-01-02.txt")
    assert json.loads(js.read_text())["shape"] == "0.5b" and "--shape 0.5b" in txt.read_text()
