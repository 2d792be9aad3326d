"""Engine target presets of ``blockpilot export --target``: what each deployment platform builds with, for
which GPU, through which attention route, and which quantization gate its recipe must pass.

* ``rtx`` (alias ``rtx-ada``): sm 8.9, TensorRT-RTX on any x86 machine (no GPU needed); native attention
  (TensorRT's attention layer, ONNX ``Attention`` at opset 23).
* ``rtx-blackwell``: sm 12.0, TensorRT-RTX; native attention.
* ``orin``: sm 8.7, JetPack 6's TensorRT 10.3 on the Orin itself; the ``BlockDiffusionAttention`` plugin
  (10.3 has no attention layer) where torch and Triton import, else the decomposed graph, whose attention
  pattern TensorRT fuses itself.
* ``thor``: sm 11.0, JetPack 7's TensorRT 10.13 on the Thor itself; native where its TensorRT is 10.14 or
  newer, else the plugin or the decomposed graph as on Orin (``auto`` picks).
* ``h100``: sm 9.0, TensorRT 10.14+ / 11 on the H100 box; native (the plugin or decomposed on an older TensorRT).

The plugin runs its Triton kernel through torch when the engine runs, so ``auto`` takes it only where both
import (:func:`auto_attention` decides, :func:`plugin_runtime_available` looks): TensorRT builds and runs on
the same device, and an engine whose plugin cannot load there would be no use.

TensorRT proper builds only for the GPU it runs on, so ``orin``/``thor``/``h100`` engines are built on that
platform (``blockpilot export`` runs there unchanged); TensorRT-RTX builds ahead of time for a chosen compute
capability on a machine without a GPU, but its engines run only on sm 8.0/8.6/8.9/12.x and it builds no
plugin layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import BlockpilotError

ATTENTION_ROUTES = ("decomposed", "native", "plugin")
# Recipes whose graphs a bundle carries (standard FP8 Q/DQ). NVFP4 / W4A8 graphs keep modelopt's custom nodes, which
# neither ONNX Runtime nor TensorRT-RTX runs, and INT8 SmoothQuant graphs are not exported yet.
EXPORTABLE_RECIPES = ("fp8",)
NATIVE_MIN_TENSORRT = (10, 14)  # IAttention and the ONNX Attention op arrived in TensorRT 10.14
PLUGIN_RUNTIME = ("torch", "triton")  # what the plugin's kernel runs through (blockpilot.trt.plugin.run_plugin)


class EngineTargetError(BlockpilotError, ValueError):
    """An engine target that is unknown, or that this machine's TensorRT cannot build."""


@dataclass(frozen=True)
class EngineTarget:
    name: str
    gate: str  # the blockpilot.quant.targets target a recipe is checked against
    sm: str  # the compute capability the engines run on ("8.9")
    flavors: tuple[str, ...]  # TensorRT flavors that can build it ("tensorrt", "tensorrt-rtx")
    attention: str  # the preferred route; "native" falls back to "plugin" on TensorRT older than 10.14
    precisions: tuple[str, ...]  # engine precisions it builds: fp32, fp16, fp8
    platform: str

    @property
    def ahead_of_time(self) -> bool:
        """Whether the engines are built for ``sm`` from any machine (TensorRT-RTX), not on the GPU itself."""
        return "tensorrt-rtx" in self.flavors


ENGINE_TARGETS: MappingProxyType[str, EngineTarget] = MappingProxyType({
    "rtx": EngineTarget("rtx", "rtx-ada", "8.9", ("tensorrt-rtx",), "native", ("fp32", "fp16", "fp8"),
                        "Ada workstation / L4-class GPU, TensorRT-RTX engines built ahead of time"),
    "rtx-blackwell": EngineTarget("rtx-blackwell", "rtx-ada", "12.0", ("tensorrt-rtx",), "native",
                                  ("fp32", "fp16", "fp8"), "Blackwell workstation GPU, TensorRT-RTX engines"),
    "orin": EngineTarget("orin", "orin", "8.7", ("tensorrt",), "plugin", ("fp32", "fp16"),
                         "Jetson Orin, JetPack 6 (TensorRT 10.3), built on the Orin"),
    "thor": EngineTarget("thor", "thor", "11.0", ("tensorrt",), "native", ("fp32", "fp16", "fp8"),
                         "Jetson Thor, JetPack 7 (TensorRT 10.13), built on the Thor"),
    "h100": EngineTarget("h100", "h100", "9.0", ("tensorrt",), "native", ("fp32", "fp16", "fp8"),
                         "H100 box with TensorRT 10.14+ / 11, built on the H100"),
})
ALIASES = MappingProxyType({"rtx-ada": "rtx"})
# ``--target cpu`` builds no engine: the bundle's ONNX Runtime graphs run on the CPU (quantize's ``cpu`` target).
CPU_TARGET = "cpu"


def resolve_engine_target(name: str) -> EngineTarget:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    target = ENGINE_TARGETS.get(key)
    if target is None:
        raise EngineTargetError(f"unknown engine target {name!r}; targets: {', '.join(ENGINE_TARGETS)} "
                                f"(aliases: {', '.join(f'{a} = {b}' for a, b in ALIASES.items())})")
    return target


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def has_native_attention(flavor: str, version: str) -> bool:
    """Whether TensorRT ``flavor`` ``version`` has the attention layer (TensorRT-RTX: always)."""
    return flavor == "tensorrt-rtx" or _version_tuple(version) >= NATIVE_MIN_TENSORRT


def auto_attention(target: EngineTarget, flavor: str, version: str, *, plugin_runtime: bool) -> str:
    """The route ``--attention auto`` takes (a pure function of what it is given).

    The target's preference; ``native`` becomes ``plugin`` where TensorRT has no attention layer (proper older
    than 10.14), and ``plugin`` becomes ``decomposed`` where the plugin cannot run: TensorRT-RTX builds no plugin
    layers, and without ``plugin_runtime`` (torch and Triton importable) the engine could not run its kernel.
    """
    route = target.attention
    if route == "native" and not has_native_attention(flavor, version):
        route = "plugin"
    if route == "plugin" and (flavor == "tensorrt-rtx" or not plugin_runtime):
        route = "decomposed"
    return route


def plugin_runtime_available(*, import_them: bool = True) -> bool:
    """Whether torch and Triton (:data:`PLUGIN_RUNTIME`) import here; ``import_them=False`` only looks whether
    they are installed (cheap: nothing imported), for commands that must stay light."""
    import importlib
    import importlib.util

    for module in PLUGIN_RUNTIME:
        try:
            if importlib.util.find_spec(module) is None:
                return False
            if import_them:
                importlib.import_module(module)
        except Exception:  # a torch whose CUDA libraries are missing fails to import with OSError and others
            return False
    return True


def attention_route(target: EngineTarget, flavor: str, version: str, requested: str = "auto", *,
                    plugin_runtime: bool | None = None) -> str:
    """The attention route the LM-step engine of ``target`` takes on TensorRT ``flavor`` ``version``.

    ``auto`` is :func:`auto_attention`, with ``plugin_runtime`` looked up (:func:`plugin_runtime_available`) when
    not given and the answer depends on it. An explicit route is honoured when the flavor can build it:
    TensorRT-RTX builds no plugins and TensorRT older than 10.14 has no attention layer; ``decomposed`` builds
    everywhere.
    """
    if requested not in ("auto", *ATTENTION_ROUTES):
        raise EngineTargetError(f"attention route {requested!r}: choose auto or one of {', '.join(ATTENTION_ROUTES)}")
    if requested == "auto":
        if plugin_runtime is None:  # look only where the answer depends on it (importing torch takes seconds)
            wants_plugin = auto_attention(target, flavor, version, plugin_runtime=True) == "plugin"
            plugin_runtime = plugin_runtime_available() if wants_plugin else True
        return auto_attention(target, flavor, version, plugin_runtime=plugin_runtime)
    if requested == "plugin" and flavor == "tensorrt-rtx":
        raise EngineTargetError(f"target {target.name}: TensorRT-RTX builds no plugin layers; use --attention "
                                "native or decomposed")
    if requested == "native" and not has_native_attention(flavor, version):
        raise EngineTargetError(f"target {target.name}: TensorRT {version} has no attention layer (needs "
                                f"{'.'.join(map(str, NATIVE_MIN_TENSORRT))}+); use --attention plugin or decomposed")
    return requested


def check_buildable_here(target: EngineTarget, trt: Any, current_sm: str | None) -> None:
    """Refuse, with what to do instead, a target this machine's TensorRT cannot build.

    ``trt`` is a :class:`blockpilot.export.trt_build.TensorRT` (its ``flavor`` and ``version`` are read);
    ``current_sm`` is the compute capability of this machine's GPU (``None`` without one).
    """
    if trt.flavor not in target.flavors:
        needs = " or ".join({"tensorrt": "TensorRT proper (`tensorrt`)",
                             "tensorrt-rtx": "TensorRT-RTX (`tensorrt_rtx`)"}[f] for f in target.flavors)
        raise EngineTargetError(f"target {target.name} ({target.platform}) needs {needs}; this machine has "
                                f"{trt.flavor} {trt.version}. "
                                + ("Run the same `blockpilot export` on that platform (TensorRT proper builds for "
                                   "the GPU it runs on)." if not target.ahead_of_time else
                                   "Install tensorrt-rtx-cu13 (pip) to build it ahead of time."))
    if not target.ahead_of_time:
        if current_sm is None:
            raise EngineTargetError(f"target {target.name}: TensorRT proper builds for the GPU it runs on, and "
                                    "this machine has none")
        if current_sm != target.sm:
            raise EngineTargetError(f"target {target.name} is sm {target.sm}, but this machine's GPU is sm "
                                    f"{current_sm}: build on the {target.platform.split(',')[0]}")


def current_compute_capability() -> str | None:
    """``"major.minor"`` of CUDA device 0 through torch, or ``None`` without a usable GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}"
    except Exception:  # a broken driver means no GPU to build for
        return None


def check_export_request(target: str | None, recipe: str | None) -> tuple[str, ...]:
    """``blockpilot export --target T1,T2 --recipe R``, checked before anything loads: known target names (those of
    ``quantize --target`` too), the recipe against each target's precision gate, and a recipe a bundle can carry.
    Returns the engine target names (``cpu`` builds none). Errors name the flags."""
    from ..cli_common import UserError, about

    names = tuple(t.strip() for t in (target or "").split(",") if t.strip())
    if target is not None and not names:
        raise UserError("--target: give at least one target name")
    with about("--target"):
        gates = [CPU_TARGET if name.lower() == CPU_TARGET else resolve_engine_target(name).gate for name in names]
    if recipe is not None:
        from ..quant.recipes import resolve_recipe
        from ..quant.targets import check_recipe

        with about("--recipe"):
            resolved = resolve_recipe(recipe)
            for gate in gates:
                check_recipe(resolved, gate)
        if recipe not in EXPORTABLE_RECIPES:
            raise UserError(f"--recipe {recipe}: bundles carry {', '.join(EXPORTABLE_RECIPES)} graphs today (NVFP4 / "
                            "W4A8 graphs hold modelopt's custom nodes, which neither ONNX Runtime nor TensorRT-RTX "
                            "runs; INT8 SmoothQuant graphs are not exported yet); `blockpilot quantize` runs every "
                            "recipe for an accuracy study")
    return tuple(name for name in names if name.lower() != CPU_TARGET)
