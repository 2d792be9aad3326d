"""The engine profile each Jetson builds on the device, tied to the export presets
(:data:`blockpilot.export.targets.ENGINE_TARGETS`) and the quantization gates
(:data:`blockpilot.quant.targets.TARGETS`).

* Orin (sm 8.7, JetPack 6, TensorRT 10.3): fp16 engines, LM-step attention through the ``BlockDiffusionAttention``
  plugin where torch and Triton import on the Orin, else the decomposed graph (TensorRT 10.3 has no attention layer
  but fuses the decomposed pattern itself). TensorRT there has no FP8 or FP4 kernels; INT8 SmoothQuant passes the
  ``orin`` gate but bundles do not carry INT8 graphs yet (``export --recipe`` is fp8 only), so fp16 it is.
* Thor (sm 11.0, JetPack 7): the ``fp8`` recipe (modelopt Q/DQ graphs, strongly typed FP8 engines); on TensorRT
  10.13 the plugin or the decomposed graph as on Orin, TensorRT's own attention layer from 10.14 (JetPack 7.2's 10.16).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import BlockpilotError
from ..export.targets import ENGINE_TARGETS, PLUGIN_RUNTIME, EngineTarget, attention_route
from .platform import JetsonPlatform

# platform -> (recipe or None for unquantized graphs, engine precision used without a recipe)
PRECISIONS: Mapping[str, tuple[str | None, str]] = MappingProxyType({"orin": (None, "fp16"), "thor": ("fp8", "fp16")})
DEFAULT_CALIB = 32


def default_timing_cache() -> str:
    """Where on-device builds keep TensorRT's timing cache, so a rebuild skips tactic timing."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "blockpilot" / "tensorrt-timing.cache")


class ProfileError(BlockpilotError, ValueError):
    """No engine profile for this platform."""


@dataclass(frozen=True)
class EngineProfile:
    """What ``blockpilot jetson build`` builds here: the engine target, recipe, precision and attention route."""

    platform: str
    target: str
    gate: str  # the blockpilot.quant.targets target the recipe is checked against
    recipe: str | None
    engine_precision: str  # the engines' precision: the recipe's format when there is one
    attention: str  # auto | plugin | native: "auto" while the TensorRT version is unknown
    tensorrt: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


def engine_profile(platform: JetsonPlatform, *, attention: str = "auto",
                   plugin_runtime: bool | None = None) -> EngineProfile:
    """The profile of ``platform``: its :data:`ENGINE_TARGETS` preset, the recipe its gate runs for real, and the
    attention route its TensorRT takes for ``attention`` (:func:`blockpilot.export.targets.attention_route`, which
    refuses a route this TensorRT cannot build; ``plugin_runtime``: whether torch and Triton import here, looked up
    when ``None``)."""
    if platform.name not in PRECISIONS:
        raise ProfileError(f"no engine profile for platform {platform.name!r}; profiles: {', '.join(PRECISIONS)}")
    target: EngineTarget = ENGINE_TARGETS[platform.name]
    recipe, precision = PRECISIONS[platform.name]
    notes: list[str] = []
    if platform.sm != target.sm:
        notes.append(f"this GPU is sm {platform.sm} but the {target.name} target builds for sm {target.sm}")
    if platform.tensorrt is None:
        if attention == "auto":
            notes.append("TensorRT version unknown: the attention route is picked at build time (--attention auto)")
    else:
        if not platform.tensorrt.startswith("10."):
            notes.append(f"TensorRT {platform.tensorrt}: the plugin needs TensorRT 10 (IPluginV3); JetPack 6.1+ has it")
        requested, attention = attention, attention_route(target, "tensorrt", platform.tensorrt, attention,
                                                          plugin_runtime=plugin_runtime)
        if requested == "auto" and attention == "decomposed" and target.attention != "decomposed":
            notes.append(f"attention decomposed: the plugin route needs {' and '.join(PLUGIN_RUNTIME)} on this "
                         "device (`blockpilot jetson doctor` says what to install); TensorRT fuses the decomposed "
                         "attention itself")
    if platform.name == "orin":
        notes.append("fp16 engines: Orin's TensorRT has no FP8/FP4; INT8 SmoothQuant is not exported into bundles yet")
    return EngineProfile(platform=platform.name, target=target.name, gate=target.gate, recipe=recipe,
                         engine_precision=recipe or precision, attention=attention, tensorrt=platform.tensorrt,
                         notes=tuple(notes))


def check_gate(profile: EngineProfile) -> list[str]:
    """Run the profile's recipe through its target's quantization gate (notes; raises
    :class:`blockpilot.quant.targets.PrecisionNotSupportedError`). Imports torch, so it is not called by ``info``."""
    if profile.recipe is None:
        return []
    from ..quant.recipes import resolve_recipe
    from ..quant.targets import check_recipe

    return check_recipe(resolve_recipe(profile.recipe), profile.gate)


def export_args(profile: EngineProfile, checkpoint: str = "CHECKPOINT_DIR", out: str = "BUNDLE_DIR", *,
                calib: int = DEFAULT_CALIB, timing_cache: str | None = "") -> list[str]:
    """The ``blockpilot export`` command line (argv, program name first) that builds ``profile``'s bundle;
    ``timing_cache`` ``""`` is :func:`default_timing_cache`, ``None`` leaves it out."""
    timing_cache = default_timing_cache() if timing_cache == "" else timing_cache
    args = ["blockpilot", "export", "--checkpoint", checkpoint, "--out", out, "--target", profile.target]
    if profile.recipe is not None:
        args += ["--recipe", profile.recipe, "--calib", str(calib)]
    else:
        args += ["--engine-precision", profile.engine_precision]
    args += ["--attention", profile.attention]
    if timing_cache:
        args += ["--timing-cache", timing_cache]
    return args


def recommended_export_args(platform: JetsonPlatform, checkpoint: str = "CHECKPOINT_DIR", out: str = "BUNDLE_DIR",
                            *, calib: int = DEFAULT_CALIB, timing_cache: str | None = "",
                            plugin_runtime: bool | None = None) -> list[str]:
    """The exact ``blockpilot export ... --target orin|thor ...`` command line for ``platform``."""
    return export_args(engine_profile(platform, plugin_runtime=plugin_runtime), checkpoint, out, calib=calib,
                       timing_cache=timing_cache)
