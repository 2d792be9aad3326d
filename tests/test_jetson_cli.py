"""``blockpilot jetson info`` and ``build`` on fake filesystem roots of real boards (and of an x86 machine)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jetson_samples import AGX_ORIN_64GB, AGX_THOR, AGX_XAVIER, CUDA_VERSION_JSON, ORIN_NANO_SUPER, write_root

from blockpilot.cli import _cmd_export, build_parser, main
from blockpilot.export import bundle_export
from blockpilot.vla.reference_model import SHIPPED_MODEL

CKPT = str(SHIPPED_MODEL)  # build checks --checkpoint before any work, so it must be a checkpoint directory


def test_info_on_an_agx_orin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_root(tmp_path / "orin", AGX_ORIN_64GB, cuda_json=CUDA_VERSION_JSON)
    assert main(["jetson", "info", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "platform  orin (tegra234, sm 8.7)" in out and "module    Jetson AGX Orin 64GB" in out
    assert "tensorrt  10.3  [matrix L4T 36.4.3, verified]" in out
    assert f"cuda      12.6  [{root}/usr/local/cuda/version.json]" in out
    assert "profile   target orin, recipe none, fp16 engines, attention plugin" in out
    command = next(line for line in out.splitlines() if line.startswith("export ")).split(None, 1)[1]
    argv = shlex.split(command)
    args = build_parser().parse_args(argv[1:])
    assert args.func is _cmd_export and args.target == "orin" and args.attention == "plugin"


def test_info_json_on_a_thor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_root(tmp_path / "thor", AGX_THOR)
    assert main(["jetson", "info", "--root", str(root), "--json", "--checkpoint", "/m", "--out", "/b"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["jetson"] is True
    assert data["platform"]["jetpack"] == "7.0" and data["platform"]["module"] == "Jetson AGX Thor T5000 128GB"
    assert data["profile"]["recipe"] == "fp8" and data["profile"]["attention"] == "plugin"
    assert data["export_command"][:8] == ["blockpilot", "export", "--checkpoint", "/m", "--out", "/b", "--target",
                                          "thor"]
    assert build_parser().parse_args(data["export_command"][1:]).recipe == "fp8"


def test_info_off_jetson_and_on_an_unsupported_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x86 = write_root(tmp_path / "x86", None)
    assert main(["jetson", "info", "--root", str(x86)]) == 0
    assert capsys.readouterr().out.startswith(f"not a Jetson (no NVIDIA Tegra device tree under {x86})")
    assert main(["jetson", "info", "--root", str(x86), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jetson"] is False
    assert main(["jetson", "info", "--root", str(write_root(tmp_path / "xavier", AGX_XAVIER))]) == 2
    assert "tegra194 (Jetson Xavier) is not a blockpilot target" in capsys.readouterr().err


def test_info_in_a_fresh_process_on_this_machine() -> None:
    result = subprocess.run([sys.executable, "-m", "blockpilot.cli", "jetson", "info", "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "jetson" in json.loads(result.stdout)


class RecordedExport:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))

        class Summary:
            @staticmethod
            def table() -> str:
                return "bundle     (recorded)"

        return Summary()


@pytest.mark.parametrize(("board", "target", "recipe", "precision"), [
    (AGX_THOR, "thor", "fp8", "fp16"), (ORIN_NANO_SUPER, "orin", None, "fp16")], ids=["thor", "orin-nano"])
def test_build_runs_export_with_the_platform_profile(board: Any, target: str, recipe: str | None, precision: str,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recorded = RecordedExport()
    monkeypatch.setattr(bundle_export, "export_bundle", recorded)
    cache = tmp_path / "cache" / "timing.cache"
    rc = main(["jetson", "build", "--checkpoint", CKPT, "--out", str(tmp_path / "bundle"), "--calib", "8",
               "--timing-cache", str(cache), "--quiet", "--root", str(write_root(tmp_path / "root", board))])
    assert rc == 0, capsys.readouterr().err
    (args, kwargs), = recorded.calls
    assert args == (SHIPPED_MODEL, tmp_path / "bundle")
    assert kwargs["targets"] == (target,) and kwargs["recipe"] == recipe and kwargs["attention"] == "plugin"
    assert kwargs["engine_precision"] == precision and kwargs["calib"] == 8
    assert kwargs["timing_cache"] == cache and cache.parent.is_dir()
    out = capsys.readouterr().out
    assert f"building {target} engines on" in out and "bundle     (recorded)" in out


def test_build_default_timing_cache_and_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = RecordedExport()
    monkeypatch.setattr(bundle_export, "export_bundle", recorded)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = str(write_root(tmp_path / "root", AGX_ORIN_64GB))
    out = str(tmp_path / "o")
    assert main(["jetson", "build", "--checkpoint", CKPT, "--out", out, "--quiet", "--root", root]) == 0
    assert recorded.calls[-1][1]["timing_cache"] == tmp_path / "xdg" / "blockpilot" / "tensorrt-timing.cache"
    assert main(["jetson", "build", "--checkpoint", CKPT, "--out", out, "--timing-cache", "", "--root", root]) == 0
    assert recorded.calls[-1][1]["timing_cache"] is None


def test_build_refuses_off_jetson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["jetson", "build", "--checkpoint", "c", "--out", str(tmp_path / "b"), "--root",
               str(write_root(tmp_path / "x86", None))])
    assert rc == 2
    err = capsys.readouterr().err
    assert "jetson build runs on the Jetson itself" in err and "blockpilot export --target rtx" in err
    assert not (tmp_path / "b").exists()


def test_jetson_parser_actions() -> None:
    parser = build_parser()
    assert parser.parse_args(["jetson", "power", "--mode", "MAXN", "--max-clocks"]).mode == "MAXN"
    with pytest.raises(SystemExit):
        parser.parse_args(["jetson", "power", "--mode", "0", "--restore"])
    with pytest.raises(SystemExit):
        parser.parse_args(["jetson", "bench", "--bundle", "b", "--checkpoint", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["jetson"])


def test_build_through_the_real_export_refuses_a_foreign_tensorrt(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # A fake Orin root on this x86 machine: the export's own checks refuse before loading anything (TensorRT proper
    # for sm 8.7 is not here), with a one-line error and exit 2.
    rc = main(["jetson", "build", "--checkpoint", CKPT, "--out", str(tmp_path / "b"), "--timing-cache", "", "--quiet",
               "--root", str(write_root(tmp_path / "orin", AGX_ORIN_64GB))])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("blockpilot jetson: error:") and ("orin" in err or "TensorRT" in err)
    assert not (tmp_path / "b").exists()
