"""``blockpilot jetson doctor`` on recorded roots and package listings of Orin (JetPack 6.0, 6.2) and Thor (JetPack
7.0), with and without a bundle, through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from jetson_samples import CUDA_VERSION_JSON, write_root
from jetson_stack_samples import (
    AGX_ORIN_JP60,
    AGX_ORIN_JP62,
    AGX_THOR_JP70,
    DPKG_ORIN_JP60,
    DPKG_ORIN_JP62,
    DPKG_THOR_JP70,
    PY_ORIN_BARE,
    PY_ORIN_CUDA13,
    PY_ORIN_JP60,
    PY_ORIN_PLUGIN,
    PY_THOR_BARE,
)

from blockpilot.cli import main
from blockpilot.formats.bundle import BundleWriter
from blockpilot.jetson import stack
from blockpilot.jetson.commands import CommandResult, ToolMissingError
from blockpilot.jetson.platform import parse_dpkg_query

JP6_TORCH = "pip install torch triton --index-url https://pypi.jetson-ai-lab.io/jp6/cu126"


def _doctor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], board: Any,
            listing: str | None, python: Mapping[str, str], *extra: str) -> tuple[int, dict[str, Any]]:
    root = write_root(tmp_path / "root", board)
    argv = ["jetson", "doctor", "--root", str(root), "--json", *extra]
    if listing is not None:
        (tmp_path / "dpkg.txt").write_text(listing)
        argv += ["--dpkg-listing", str(tmp_path / "dpkg.txt")]
    monkeypatch.setattr(stack, "python_versions", lambda: dict(python))
    rc = main(argv)
    return rc, json.loads(capsys.readouterr().out)


def _rows(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["component"]: c for c in report["checks"]}


def _bundle(tmp_path: Path, engines: Sequence[tuple[str, str, str, str]]) -> Path:
    """A real bundle holding stand-in LM-step engines: (target, sm, variant, TensorRT that built it)."""
    out = tmp_path / "bundle"
    with BundleWriter(out) as writer:
        writer.model_config, writer.schema = {"model_type": "reference"}, {}
        for target, sm, variant, trt in engines:
            src = tmp_path / f"lm_step.fp16.{variant}.engine"
            src.write_bytes(f"{target} {variant}".encode())
            writer.add_engine(src, target=target, sm=sm, role="lm_step", variant=variant, precision="fp16",
                              tools={"tensorrt": trt})
    return out


def test_orin_on_jetpack_6_0_cannot_run_blockpilot_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _doctor(tmp_path, monkeypatch, capsys, AGX_ORIN_JP60, DPKG_ORIN_JP60, PY_ORIN_JP60)
    assert rc == 1 and report["ok"] is False
    rows = _rows(report)
    assert rows["L4T / JetPack"]["found"] == "L4T 36.3.0 / JetPack 6.0"
    assert rows["L4T / JetPack"]["status"] == "fail"
    assert "nvidia-l4t-apt-source.list" in rows["L4T / JetPack"]["fix"] and "nvidia-jetpack" in rows[
        "L4T / JetPack"]["fix"]
    assert rows["TensorRT"]["found"] == "8.6.2.3 [dpkg libnvinfer8]" and rows["TensorRT"]["status"] == "fail"
    assert rows["CUDA"]["found"] == "12.2 [dpkg cuda-toolkit-12-2]" and rows["CUDA"]["status"] == "ok"
    assert rows["cuda-python"]["status"] == "ok"  # 12.2.1 against CUDA 12.2
    assert rows["rclpy"]["found"].startswith("3.3.13 (humble)")


def test_orin_on_jetpack_6_2_without_torch_builds_decomposed_and_is_ready(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _doctor(tmp_path, monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE)
    assert rc == 0 and report["ok"] is True
    assert report["attention"] == {"requested": "auto", "route": "decomposed"}
    rows = _rows(report)
    assert rows["TensorRT"]["found"] == "10.3.0.30 [dpkg libnvinfer10]"
    assert rows["torch"]["status"] == rows["Triton"]["status"] == "not needed"
    assert rows["cuDNN"]["found"] == "9.3.0.75 [dpkg libcudnn9-cuda-12]" and rows["cuDNN"]["status"] == "ok"
    assert rows["cuda-python"]["needed"].startswith("cuda-python >=12.6,<13")
    assert report["platform"]["jetpack"] == "6.2" and report["platform"]["l4t"] == "36.4.3"
    # Asked for the plugin without torch and Triton: the exact install command, exit 1.
    rc, report = _doctor(tmp_path / "p", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE,
                         "--attention", "plugin")
    rows = _rows(report)
    assert rc == 1 and rows["attention route"]["status"] == "fail"
    assert rows["torch"]["fix"] == rows["Triton"]["fix"] == JP6_TORCH
    assert rows["cuDNN"]["needed"].startswith("9.x")
    # With them installed, auto keeps the plugin (today's default).
    rc, report = _doctor(tmp_path / "q", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_PLUGIN)
    assert rc == 0 and report["attention"]["route"] == "plugin"
    assert _rows(report)["torch"]["found"] == "2.5.0a0+872d972e41.nv24.08"


def test_cuda_python_13_on_cuda_12_is_refused_with_the_bounded_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _doctor(tmp_path, monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_CUDA13)
    row = _rows(report)["cuda-python"]
    assert rc == 1 and row["status"] == "fail" and row["found"] == "13.0.1"
    assert row["fix"].startswith('pip install "cuda-python>=12.6,<13"')


def test_thor_on_jetpack_7_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _doctor(tmp_path, monkeypatch, capsys, AGX_THOR_JP70, DPKG_THOR_JP70, PY_THOR_BARE)
    assert rc == 0, report
    rows = _rows(report)
    assert rows["platform"]["found"] == "Jetson AGX Thor T5000 128GB (thor, sm 11.0)"
    assert rows["L4T / JetPack"]["found"] == "L4T 38.2.1 / JetPack 7.0"
    assert rows["TensorRT"]["found"] == "10.13.3.9 [dpkg libnvinfer10]"
    assert rows["CUDA"]["needed"] == "13.x" and rows["cuda-python"]["needed"].startswith("cuda-python >=13.0,<14")
    assert rows["rclpy"]["found"].startswith("7.1.5 (jazzy)") and rows["rclpy"]["status"] == "ok"
    assert report["attention"]["route"] == "decomposed"  # TensorRT 10.13, no torch: no plugin, no attention layer
    assert all(set(c) == {"component", "found", "needed", "status", "fix"} for c in report["checks"])
    # A Humble rclpy on JetPack 7 (Ubuntu 24.04) is the wrong distribution: a warning, the bundle still runs.
    listing = DPKG_THOR_JP70.replace("ros-jazzy-rclpy\t7.1.5", "ros-humble-rclpy\t3.3.16")
    rc, report = _doctor(tmp_path / "humble", monkeypatch, capsys, AGX_THOR_JP70, listing, PY_THOR_BARE)
    rows = _rows(report)
    assert rc == 0 and rows["rclpy"]["status"] == "warn" and rows["rclpy"]["fix"].startswith(
        "sudo apt install ros-jazzy-ros-base")


def test_bundle_engines_decide_the_route_and_the_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    both = _bundle(tmp_path / "both", [("orin", "8.7", "plugin", "10.3.0.30"), ("orin", "8.7", "decomposed",
                                                                                "10.3.0.30")])
    rc, report = _doctor(tmp_path / "a", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE,
                         "--bundle", str(both))
    rows = _rows(report)
    assert rc == 0 and report["attention"]["route"] == "decomposed"  # the runtime's order: decomposed first
    assert rows["engines"]["found"] == "orin (sm 8.7); lm_step decomposed/plugin"
    assert rows["TensorRT"]["needed"] == "10.3 (the engines were built with 10.3.0.30)"
    rc, report = _doctor(tmp_path / "b", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE,
                         "--bundle", str(both), "--attention", "plugin")
    assert rc == 1 and _rows(report)["torch"]["fix"] == JP6_TORCH

    plugin_only = _bundle(tmp_path / "plugin", [("orin", "8.7", "plugin", "10.3.0.30")])
    rc, report = _doctor(tmp_path / "c", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE,
                         "--bundle", str(plugin_only))
    rows = _rows(report)
    assert rc == 1 and rows["attention route"]["status"] == "fail"
    assert "--attention decomposed" not in rows["attention route"]["fix"]  # auto picks it on such a machine
    rc, _ = _doctor(tmp_path / "d", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_PLUGIN,
                    "--bundle", str(plugin_only))
    assert rc == 0
    rc, report = _doctor(tmp_path / "e", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_PLUGIN,
                         "--bundle", str(plugin_only), "--attention", "native")
    assert rc == 1 and "TensorRT 10.3.0.30 has no attention layer" in _rows(report)["attention route"]["fix"]
    rc, report = _doctor(tmp_path / "f", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_PLUGIN,
                         "--bundle", str(both), "--attention", "decomposed")
    assert rc == 0 and report["attention"]["route"] == "decomposed"
    rc, report = _doctor(tmp_path / "g", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_PLUGIN,
                         "--bundle", str(_bundle(tmp_path / "dec", [("orin", "8.7", "decomposed", "10.3.0.30")])),
                         "--attention", "plugin")
    assert rc == 1 and _rows(report)["attention route"]["fix"].endswith("--attention plugin")


def test_bundle_built_elsewhere_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    newer = _bundle(tmp_path / "newer", [("orin", "8.7", "decomposed", "10.7.0.23")])
    rc, report = _doctor(tmp_path / "a", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE,
                         "--bundle", str(newer))
    row = _rows(report)["TensorRT"]
    assert rc == 1 and row["status"] == "fail" and "blockpilot jetson build" in row["fix"]
    workstation = _bundle(tmp_path / "rtx", [("rtx", "8.9", "native", "1.7.1.116")])
    rc, report = _doctor(tmp_path / "b", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, PY_ORIN_BARE,
                         "--bundle", str(workstation))
    row = _rows(report)["engines"]
    assert rc == 1 and row["found"] == "rtx (sm 8.9)" and row["needed"] == "orin engines (sm 8.7)"
    assert row["fix"].startswith("build them on this device: blockpilot jetson build")


def test_table_output_and_off_jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(stack, "python_versions", lambda: dict(PY_ORIN_CUDA13))
    root = write_root(tmp_path / "orin", AGX_ORIN_JP62)
    (tmp_path / "dpkg.txt").write_text(DPKG_ORIN_JP62)
    assert main(["jetson", "doctor", "--root", str(root), "--dpkg-listing", str(tmp_path / "dpkg.txt")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["component", "found", "needed", "status", "fix"]
    row = next(line for line in lines if line.startswith("cuda-python"))
    assert " fail " in row and row.endswith('(cuda-python 13 needs a CUDA 13 driver)')
    assert lines[-1].startswith("FAIL: an on-device build") and "(1 problem)" in lines[-1]
    x86 = write_root(tmp_path / "x86", None)
    assert main(["jetson", "doctor", "--root", str(x86), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["jetson"] is False and report["checks"][0]["status"] == "fail"


def test_without_a_listing_the_matrix_fills_in_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(stack, "python_versions", lambda: dict(PY_ORIN_BARE))
    root = write_root(tmp_path / "orin", AGX_ORIN_JP62, cuda_json=CUDA_VERSION_JSON)
    assert main(["jetson", "doctor", "--root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = _rows(report)
    assert rows["TensorRT"]["status"] == "warn" and "no package listing" in rows["TensorRT"]["found"]
    assert rows["CUDA"]["found"] == f"12.6 [{root}/usr/local/cuda/version.json]" and rows["CUDA"]["status"] == "ok"
    assert any("--dpkg-listing" in n for n in report["notes"])


def test_tensorrt_bindings_of_the_system_python_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _doctor(tmp_path, monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62, {"cuda-python": "12.6.2"})
    row = _rows(report)["TensorRT Python"]
    assert rc == 1 and row["found"] == "10.3.0.30 [system Python only]"
    assert row["fix"].startswith("python3 -m venv --system-site-packages")
    rc, report = _doctor(tmp_path / "wheel", monkeypatch, capsys, AGX_ORIN_JP62, DPKG_ORIN_JP62,
                         {**PY_ORIN_BARE, "tensorrt": "10.13.3.9"})
    assert rc == 1 and _rows(report)["TensorRT Python"]["fix"].startswith("pip uninstall tensorrt")


def test_bad_listings_and_bundles_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(write_root(tmp_path / "orin", AGX_ORIN_JP62))
    assert main(["jetson", "doctor", "--root", root, "--dpkg-listing", str(tmp_path / "none.txt")]) == 2
    assert "--dpkg-listing" in capsys.readouterr().err
    (tmp_path / "junk.txt").write_text("this is not dpkg output\n")
    assert main(["jetson", "doctor", "--root", root, "--dpkg-listing", str(tmp_path / "junk.txt")]) == 2
    assert "expected `dpkg-query -W` output" in capsys.readouterr().err
    (tmp_path / "nb").mkdir()
    assert main(["jetson", "doctor", "--root", root, "--bundle", str(tmp_path / "nb")]) == 2
    err = capsys.readouterr().err
    assert "--bundle" in err and "no manifest.json" in err


def test_dpkg_query_through_a_runner() -> None:
    seen: list[list[str]] = []

    def runner(args: Sequence[str], stdin: str | None) -> CommandResult:
        seen.append(list(args))
        out = "".join(f"{p}\tii \t{v}\n" for p, v in parse_dpkg_query(DPKG_THOR_JP70).items())
        return CommandResult(tuple(args), 1, out + "libcudnn8\tun \t\n", "dpkg-query: no packages found matching x\n")

    found = stack.query_dpkg(runner)
    assert found["libnvinfer10"] == "10.13.3.9-1+cuda13.0" and "libcudnn8" not in found
    assert seen[0][:2] == ["dpkg-query", "-W"] and "ros-*-rclpy" in seen[0] and "libcudnn[0-9]*" in seen[0]

    def missing(args: Sequence[str], stdin: str | None) -> CommandResult:
        raise ToolMissingError("dpkg-query")

    assert stack.query_dpkg(missing) == {}


def test_plain_dpkg_query_lines() -> None:
    parsed = parse_dpkg_query("libnvinfer10:arm64\t10.3.0.30-1+cuda12.5\nlibcudnn8\t\nnvidia-jetpack\t6.2+b77\n")
    assert parsed == {"libnvinfer10": "10.3.0.30-1+cuda12.5", "nvidia-jetpack": "6.2+b77"}
    assert stack.python_versions(lambda name: {"cuda-bindings": "12.9.0", "pytorch-triton": "3.3.0"}.get(name)) == {
        "cuda-python": "12.9.0", "triton": "3.3.0"}


def test_doctor_in_a_fresh_process_imports_neither_torch_nor_triton(tmp_path: Path) -> None:
    # Through the jetson command's own parser: the top-level parser loads every command (train imports torch).
    root = write_root(tmp_path / "orin", AGX_ORIN_JP62)
    (tmp_path / "dpkg.txt").write_text(DPKG_ORIN_JP62)
    bundle = _bundle(tmp_path / "b", [("orin", "8.7", "plugin", "10.3.0.30")])
    argv = ["doctor", "--root", str(root), "--dpkg-listing", str(tmp_path / "dpkg.txt"), "--bundle", str(bundle),
            "--json"]
    code = ("import argparse, json, sys\nfrom blockpilot.jetson.cli import add_arguments, run\n"
            "parser = argparse.ArgumentParser()\nadd_arguments(parser)\n"
            f"rc = run(parser.parse_args({argv!r}))\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'triton': 'triton' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *report_lines, verdict_line = done.stdout.strip().splitlines()
    report, verdict = json.loads("\n".join(report_lines)), json.loads(verdict_line)
    assert report["attention"]["route"] == "plugin"  # the bundle's only LM-step engine
    assert verdict == {"rc": 0 if report["ok"] else 1, "torch": False, "triton": False}
