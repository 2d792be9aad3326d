"""Engine profiles per Jetson: tied to the export targets and quantization gates, and an export command line that
the real CLI parser accepts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from jetson_samples import AGX_ORIN_64GB, AGX_THOR, ORIN_NANO_SUPER

from blockpilot.cli import _cmd_export, build_parser
from blockpilot.export.targets import ENGINE_TARGETS
from blockpilot.jetson.platform import JetsonPlatform, identify
from blockpilot.jetson.profiles import (
    ProfileError,
    check_gate,
    default_timing_cache,
    engine_profile,
    export_args,
    recommended_export_args,
)
from blockpilot.quant.recipes import resolve_recipe
from blockpilot.quant.targets import PrecisionNotSupportedError, check_recipe


def _platform(board: object, **changes: object) -> JetsonPlatform:
    p = identify(board.compatible, board.release, board.model)  # type: ignore[attr-defined]
    assert p is not None
    return dataclasses.replace(p, **changes)  # type: ignore[arg-type]


def test_orin_builds_fp16_engines_with_the_plugin() -> None:
    profile = engine_profile(_platform(AGX_ORIN_64GB))
    assert (profile.target, profile.gate, profile.recipe, profile.engine_precision, profile.attention) == (
        "orin", "orin", None, "fp16", "plugin")
    assert profile.engine_precision in ENGINE_TARGETS["orin"].precisions
    assert any("no FP8/FP4" in n for n in profile.notes)
    assert check_gate(profile) == []


def test_thor_builds_fp8_with_the_plugin_on_10_13_and_native_from_10_14() -> None:
    thor = _platform(AGX_THOR)
    profile = engine_profile(thor)
    assert (profile.target, profile.gate, profile.recipe, profile.engine_precision, profile.attention) == (
        "thor", "thor", "fp8", "fp8", "plugin")
    assert profile.engine_precision in ENGINE_TARGETS["thor"].precisions
    assert engine_profile(dataclasses.replace(thor, tensorrt="10.14.1.48")).attention == "native"
    assert engine_profile(dataclasses.replace(thor, tensorrt="10.16")).attention == "native"
    unknown = engine_profile(dataclasses.replace(thor, tensorrt=None))
    assert unknown.attention == "auto" and any("TensorRT version unknown" in n for n in unknown.notes)
    assert check_gate(profile) == []  # fp8 runs for real on Thor


def test_the_orin_gate_refuses_what_thor_builds() -> None:
    # The profiles differ for a reason: the Thor recipe would not pass Orin's gate.
    with pytest.raises(PrecisionNotSupportedError, match="orin"):
        check_recipe(resolve_recipe("fp8"), ENGINE_TARGETS["orin"].gate)


def test_profile_notes_for_odd_platforms() -> None:
    old = engine_profile(_platform(AGX_ORIN_64GB, tensorrt="8.6.2"))
    assert any("needs TensorRT 10" in n for n in old.notes)
    odd = engine_profile(_platform(AGX_ORIN_64GB, sm="8.6"))
    assert any("sm 8.6 but the orin target builds for sm 8.7" in n for n in odd.notes)
    with pytest.raises(ProfileError, match="no engine profile"):
        engine_profile(_platform(AGX_ORIN_64GB, name="xavier"))


@pytest.mark.parametrize("board", [AGX_ORIN_64GB, ORIN_NANO_SUPER, AGX_THOR], ids=["agx-orin", "nano", "thor"])
def test_recommended_command_parses_with_the_real_cli(board: object, tmp_path: Path) -> None:
    platform = _platform(board)
    profile = engine_profile(platform)
    argv = recommended_export_args(platform, "/models/fast-ddrive", "/data/bundle", timing_cache=str(tmp_path / "c"))
    assert argv[:2] == ["blockpilot", "export"]
    args = build_parser().parse_args(argv[1:])
    assert args.func is _cmd_export
    assert (args.checkpoint, args.out, args.target, args.attention) == ("/models/fast-ddrive", "/data/bundle",
                                                                        platform.name, profile.attention)
    assert args.recipe == profile.recipe
    assert args.timing_cache == str(tmp_path / "c")
    if profile.recipe is None:
        assert args.engine_precision == profile.engine_precision
    else:
        assert args.calib == 32
        check_recipe(resolve_recipe(args.recipe), ENGINE_TARGETS[args.target].gate)  # raises if refused


def test_exact_command_lines() -> None:
    orin = recommended_export_args(_platform(AGX_ORIN_64GB), timing_cache=None)
    assert orin == ["blockpilot", "export", "--checkpoint", "CHECKPOINT_DIR", "--out", "BUNDLE_DIR", "--target", "orin",
                    "--engine-precision", "fp16", "--attention", "plugin"]
    thor = recommended_export_args(_platform(AGX_THOR), "ckpt", "out", calib=64, timing_cache="/tmp/t.cache")
    assert thor == ["blockpilot", "export", "--checkpoint", "ckpt", "--out", "out", "--target", "thor",
                    "--recipe", "fp8", "--calib", "64", "--attention", "plugin", "--timing-cache", "/tmp/t.cache"]
    default = export_args(engine_profile(_platform(AGX_THOR)))
    assert default[-2:] == ["--timing-cache", default_timing_cache()]


def test_default_timing_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_timing_cache() == str(tmp_path / "blockpilot" / "tensorrt-timing.cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_timing_cache() == str(Path.home() / ".cache" / "blockpilot" / "tensorrt-timing.cache")
