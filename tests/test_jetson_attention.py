"""``--attention auto`` per target: the plugin only where torch and Triton import, else the decomposed graph
(TensorRT 10.3 has no attention layer and fuses the decomposed pattern itself), native where TensorRT has it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
from jetson_samples import AGX_ORIN_64GB, AGX_THOR, write_root
from test_jetson_cli import CKPT, RecordedExport

from blockpilot.cli import build_parser, main
from blockpilot.export import bundle_export, targets
from blockpilot.export.targets import attention_route, auto_attention, plugin_runtime_available, resolve_engine_target
from blockpilot.jetson.platform import JetsonPlatform, identify
from blockpilot.jetson.profiles import engine_profile, export_args


@pytest.mark.parametrize(("target", "flavor", "version", "plugin_runtime", "route"), [
    ("orin", "tensorrt", "10.3.0.30", True, "plugin"),  # JetPack 6 with torch + Triton: today's default stays
    ("orin", "tensorrt", "10.3.0.30", False, "decomposed"),  # JetPack 6 without them: TensorRT fuses it
    ("thor", "tensorrt", "10.13.3.9", True, "plugin"),  # JetPack 7.0: no attention layer before 10.14
    ("thor", "tensorrt", "10.13.3.9", False, "decomposed"),
    ("thor", "tensorrt", "10.16.2.10", False, "native"),  # JetPack 7.2: the layer, whatever Python holds
    ("rtx", "tensorrt-rtx", "1.7.1.116", False, "native"),  # x86, TensorRT-RTX: always its attention layer
    ("rtx", "tensorrt-rtx", "1.7.1.116", True, "native"),
    ("h100", "tensorrt", "10.9.0", False, "decomposed"),
    ("h100", "tensorrt", "11.0.0", False, "native"),
])
def test_auto_attention(target: str, flavor: str, version: str, plugin_runtime: bool, route: str) -> None:
    assert auto_attention(resolve_engine_target(target), flavor, version, plugin_runtime=plugin_runtime) == route
    assert attention_route(resolve_engine_target(target), flavor, version, "auto",
                           plugin_runtime=plugin_runtime) == route


def test_tensorrt_rtx_never_gets_the_plugin_from_auto() -> None:
    # A target preferring the plugin, built with TensorRT-RTX (which builds no plugin layers): decomposed.
    plugin_pref = dataclasses.replace(resolve_engine_target("rtx"), attention="plugin")
    assert auto_attention(plugin_pref, "tensorrt-rtx", "1.7", plugin_runtime=True) == "decomposed"


def test_auto_looks_for_torch_and_triton_only_when_the_answer_depends_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    looked: list[bool] = []

    def fake(*, import_them: bool = True) -> bool:
        looked.append(import_them)
        return False

    monkeypatch.setattr(targets, "plugin_runtime_available", fake)
    assert attention_route(resolve_engine_target("rtx"), "tensorrt-rtx", "1.7", "auto") == "native"
    assert attention_route(resolve_engine_target("thor"), "tensorrt", "10.14.1", "auto") == "native"
    assert looked == []
    assert attention_route(resolve_engine_target("orin"), "tensorrt", "10.3.0", "auto") == "decomposed"
    assert looked == [True]  # the export imports them: a broken torch counts as absent
    assert attention_route(resolve_engine_target("orin"), "tensorrt", "10.3.0", "plugin") == "plugin"  # as asked
    assert looked == [True]


def test_plugin_runtime_available_needs_every_module_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bp_fake_torch.py").write_text("X = 1\n")
    (tmp_path / "bp_broken_triton.py").write_text("raise OSError('libcudart.so.12: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(targets, "PLUGIN_RUNTIME", ("bp_fake_torch", "bp_broken_triton"))
    assert plugin_runtime_available(import_them=False) is True  # installed...
    assert plugin_runtime_available() is False  # ...but it does not import
    monkeypatch.setattr(targets, "PLUGIN_RUNTIME", ("bp_fake_torch", "bp_not_installed_at_all"))
    assert plugin_runtime_available(import_them=False) is False
    monkeypatch.setattr(targets, "PLUGIN_RUNTIME", ("bp_fake_torch",))
    assert plugin_runtime_available() is True
    sys.modules.pop("bp_fake_torch", None)


def _platform(board: Any) -> JetsonPlatform:
    p = identify(board.compatible, board.release, board.model)
    assert p is not None
    return p


def test_profiles_follow_the_plugin_runtime() -> None:
    orin = _platform(AGX_ORIN_64GB)
    bare = engine_profile(orin, plugin_runtime=False)
    assert bare.attention == "decomposed"
    assert any("needs torch and triton" in n and "jetson doctor" in n for n in bare.notes)
    argv = export_args(bare, timing_cache=None)
    assert build_parser().parse_args(argv[1:]).attention == "decomposed"
    assert engine_profile(orin, plugin_runtime=True).attention == "plugin"
    assert engine_profile(_platform(AGX_THOR), plugin_runtime=False).attention == "decomposed"
    asked = engine_profile(orin, attention="plugin", plugin_runtime=False)  # explicit: honoured, no note
    assert asked.attention == "plugin" and not any("needs torch" in n for n in asked.notes)


def test_jetson_build_auto_without_torch_builds_decomposed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = RecordedExport()
    monkeypatch.setattr(bundle_export, "export_bundle", recorded)
    monkeypatch.setattr(targets, "plugin_runtime_available", lambda *, import_them=True: False)
    root = str(write_root(tmp_path / "root", AGX_ORIN_64GB))
    base = ["jetson", "build", "--checkpoint", CKPT, "--out", str(tmp_path / "b"), "--timing-cache", "", "--quiet",
            "--root", root]
    assert main(base) == 0
    assert recorded.calls[-1][1]["attention"] == "decomposed"
    assert main([*base, "--attention", "plugin"]) == 0  # asked for: built (the doctor says what it needs)
    assert recorded.calls[-1][1]["attention"] == "plugin"


def test_jetson_build_refuses_native_on_tensorrt_10_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    recorded = RecordedExport()
    monkeypatch.setattr(bundle_export, "export_bundle", recorded)
    rc = main(["jetson", "build", "--checkpoint", CKPT, "--out", str(tmp_path / "b"), "--attention", "native",
               "--root", str(write_root(tmp_path / "root", AGX_ORIN_64GB))])
    assert rc == 2 and recorded.calls == []
    assert "TensorRT 10.3 has no attention layer" in capsys.readouterr().err


def test_jetson_info_shows_decomposed_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[bool] = []

    def fake(*, import_them: bool = True) -> bool:
        calls.append(import_them)
        return False

    monkeypatch.setattr(targets, "plugin_runtime_available", fake)
    assert main(["jetson", "info", "--root", str(write_root(tmp_path / "orin", AGX_ORIN_64GB))]) == 0
    out = capsys.readouterr().out
    assert "attention decomposed" in out and "--attention decomposed" in out
    assert calls and not any(calls)  # info only looks: it imports neither torch nor Triton
