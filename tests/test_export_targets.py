"""Engine target presets (which TensorRT builds what, through which attention route) and export progress bars."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from blockpilot.export.progress import StageProgress
from blockpilot.export.targets import (
    ENGINE_TARGETS,
    EngineTargetError,
    attention_route,
    check_buildable_here,
    resolve_engine_target,
)
from blockpilot.quant.targets import TARGETS


def test_presets_cover_the_platforms_and_their_gates_exist() -> None:
    assert set(ENGINE_TARGETS) == {"rtx", "rtx-blackwell", "orin", "thor", "h100"}
    for target in ENGINE_TARGETS.values():
        assert target.gate in TARGETS  # every preset is checked by a quantization gate
    assert resolve_engine_target(" RTX-Ada ").name == "rtx"
    assert resolve_engine_target("orin").sm == "8.7" and not resolve_engine_target("orin").ahead_of_time
    with pytest.raises(EngineTargetError, match="unknown engine target 'xavier'"):
        resolve_engine_target("xavier")


@pytest.mark.parametrize(("target", "flavor", "version", "requested", "route"), [
    ("rtx", "tensorrt-rtx", "1.7.1.116", "auto", "native"),
    ("rtx", "tensorrt-rtx", "1.7.1.116", "decomposed", "decomposed"),
    ("orin", "tensorrt", "10.3.0", "auto", "plugin"),  # JetPack 6: no attention layer
    ("thor", "tensorrt", "10.13.2", "auto", "plugin"),  # JetPack 7: the layer arrived in 10.14
    ("thor", "tensorrt", "10.14.1", "auto", "native"),
    ("h100", "tensorrt", "11.0.0", "auto", "native"),
    ("h100", "tensorrt", "10.9.0", "auto", "plugin"),
    ("orin", "tensorrt", "10.3.0", "decomposed", "decomposed"),
])
def test_attention_route_follows_the_tensorrt_version(target: str, flavor: str, version: str, requested: str,
                                                      route: str) -> None:
    # torch and Triton importable (plugin_runtime=True): the routes of before; without them see test_jetson_attention
    assert attention_route(resolve_engine_target(target), flavor, version, requested, plugin_runtime=True) == route


def test_attention_routes_a_tensorrt_cannot_build_are_refused() -> None:
    with pytest.raises(EngineTargetError, match="no plugin layers"):
        attention_route(resolve_engine_target("rtx"), "tensorrt-rtx", "1.7", "plugin")
    with pytest.raises(EngineTargetError, match=r"TensorRT 10\.3\.0 has no attention layer"):
        attention_route(resolve_engine_target("orin"), "tensorrt", "10.3.0", "native")
    with pytest.raises(EngineTargetError, match="choose auto"):
        attention_route(resolve_engine_target("orin"), "tensorrt", "10.3.0", "fused")


def test_buildable_here_names_what_to_do_instead() -> None:
    rtx = SimpleNamespace(flavor="tensorrt-rtx", version="1.7.1")
    proper = SimpleNamespace(flavor="tensorrt", version="10.3.0")
    check_buildable_here(resolve_engine_target("rtx"), rtx, None)  # ahead of time: no GPU needed
    with pytest.raises(EngineTargetError, match="Run the same `blockpilot export` on that platform"):
        check_buildable_here(resolve_engine_target("orin"), rtx, None)
    with pytest.raises(EngineTargetError, match="Install tensorrt-rtx"):
        check_buildable_here(resolve_engine_target("rtx"), proper, "8.7")
    with pytest.raises(EngineTargetError, match="has none"):
        check_buildable_here(resolve_engine_target("orin"), proper, None)
    with pytest.raises(EngineTargetError, match=r"sm 8\.7, but this machine.s GPU is sm 9\.0"):
        check_buildable_here(resolve_engine_target("orin"), proper, "9.0")
    check_buildable_here(resolve_engine_target("orin"), proper, "8.7")


def test_progress_prints_one_line_per_stage_off_a_terminal() -> None:
    out = io.StringIO()
    progress = StageProgress(out, stages=2)
    with progress.stage("onnx", total=2) as stage:
        progress.advance(stage, "vision")
        progress.advance(stage, "lm_step")
    with progress.stage("engines", total=3) as stage:
        progress.advance(stage, "one")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # no redraws in a log
    assert lines[0].startswith("[1/2] onnx") and "2/2" in lines[0]
    assert lines[1].startswith("[2/2] engines") and "3/3" in lines[1]  # a finished stage shows as complete
    assert set(progress.seconds) == {"onnx", "engines"}


def test_progress_redraws_in_place_on_a_terminal_and_can_be_silenced() -> None:
    out = io.StringIO()
    progress = StageProgress(out, enabled=True, stages=1)
    with progress.stage("engines", total=2) as stage:
        progress.advance(stage, "vision rtx")
    text = out.getvalue()
    # one tqdm bar redrawn in place (\r), left complete on its own line when the stage ends
    assert text.count("\r") >= 2 and text.endswith("\n") and text.count("\n") == 1
    final = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert final.startswith("[1/1] engines") and "2/2" in final and "vision rtx" in final
    quiet = io.StringIO()
    with StageProgress(quiet, enabled=False).stage("load"):
        pass
    assert quiet.getvalue() == ""
