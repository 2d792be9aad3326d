"""The console script end to end: help, inspect, scaffold and the demo, in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockpilot.cli import build_parser
from blockpilot.vla.reference_model import write_reference_checkpoint


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockpilot.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_lists_every_command() -> None:
    result = _run("--help")
    assert result.returncode == 0
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {"bench", "demo", "eval", "export", "inspect", "jetson", "keygen", "plan", "quantize",
                             "ros", "scaffold", "sign", "train-reference", "train-robot", "verify"}
    for name in commands:
        assert name in result.stdout


def test_inspect_reference_checkpoint(tmp_path: Path) -> None:
    ckpt = write_reference_checkpoint(tmp_path / "ckpt")
    result = _run("inspect", str(ckpt))
    assert result.returncode == 0, result.stderr
    assert "architecture qwen2_5_vl" in result.stdout
    assert '"block_size": 32' in result.stdout


def test_inspect_broken_checkpoint_names_the_file(tmp_path: Path) -> None:
    ckpt = write_reference_checkpoint(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = _run("inspect", str(ckpt))
    assert result.returncode == 2
    assert "model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("schema", ["driving-nuscenes", "driving-wod", "robot"])
def test_scaffold_prints_slots(schema: str) -> None:
    result = _run("scaffold", "--schema", schema)
    assert result.returncode == 0, result.stderr
    assert "value slots" in result.stdout
    assert ("<trajectory.0.0:" in result.stdout) == schema.startswith("driving")


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = _run("demo", "--out", str(tmp_path / "demo"), "--heldout-scenes", "1", "--robot-episodes", "1")
    assert result.returncode == 0, result.stderr
    # The shipped model went into a verified bundle, replayed on ONNX Runtime through the nuScenes
    # reader, the evaluator and the report.
    manifest = json.loads((tmp_path / "demo" / "bundle" / "manifest.json").read_text())
    assert {f for f in manifest["files"] if f.startswith("engines/") and f.endswith(".engine")} == {
        "engines/rtx/lm_step.fp16.native.engine", "engines/rtx/vision.fp16.decomposed.engine"}
    header = json.loads((tmp_path / "demo" / "eval" / "results.jsonl").read_text().splitlines()[0])["header"]
    assert header["backend"] == "onnxruntime"
    report = tmp_path / "demo" / "eval" / "report"
    assert (report / "summary.html").is_file() and (report / "metrics.json").is_file()
    assert "L2" in (report / "summary.md").read_text()
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["round_trip_exact"] is True
    assert summary["image_grid_thw"] == [[1, 8, 8]]
    assert 0 < summary["first_block_masked"] <= 32
    assert set(summary["timings_ms"]) >= {"load_checkpoint", "prefill", "block_step", "plan"}
    # The scaffold decoder is lossless: the planner's answer is the constrained AR baseline's.
    assert summary["plan"]["same_answer_as_ar"] is True
    assert summary["plan"]["stats"]["decoder"] == "scaffold"
    # The robot part: the shipped SO-101 model's bundle plans on ONNX Runtime, lossless against AR, then drives the
    # arm in closed loop on one held-out seed beside the expert and the hold baseline.
    robot = summary["robot"]
    assert robot["plan"]["same_answer_as_ar"] is True and robot["plan"]["forwards"] < robot["plan"]["ar_forwards"]
    assert set(robot["closed_loop"]) == {"model", "expert", "hold"}
    assert robot["closed_loop"]["expert"]["succeeded"] == 1 and robot["closed_loop"]["hold"]["succeeded"] == 0
    assert (tmp_path / "demo" / "robot-closed-loop" / "report.html").is_file()
    assert "robot closed loop" in result.stdout
