"""Which precisions each deployment target runs for real, and a gate that refuses the others.

A format is *real* on a target when its engines have kernels for it (a speed and memory gain); it is
*emulated* when it can only run as fake quantization (quantize-dequantize in higher precision), which
is good for accuracy studies and nothing else. :func:`check_recipe` refuses a recipe that needs a
format the target cannot run for real, unless emulation is allowed and possible there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from ..errors import BlockpilotError
from .recipes import AUTO, FORMATS, KV_PROJECTIONS, NONE, Recipe, as_module_names

_SHOWN = 4  # modules named per offending format in a refusal


class TargetError(BlockpilotError, ValueError):
    """An unknown deployment target."""


class PrecisionNotSupportedError(TargetError):
    """A recipe needs a format the target cannot run."""


@dataclass(frozen=True)
class Target:
    name: str
    sm: str  # CUDA compute capability, e.g. "sm_87"; "n/a" for the CPU
    real_formats: frozenset[str]
    emulated_formats: frozenset[str]
    notes: str
    emulation_only: bool = False  # no low-precision kernels at all: emulation needs no opt-in

    def supports(self) -> str:
        """Human-readable: what runs for real, and what only as fake quantization."""
        real = ", ".join(_label(f) for f in sorted(self.real_formats))
        emulated = ", ".join(sorted(self.emulated_formats))
        return f"runs for real: {real}" + (f"; as fake quantization only: {emulated}" if emulated else "")


def _label(fmt: str) -> str:
    return {"int8_sq": "int8_sq (INT8 SmoothQuant)", NONE: "none (FP16/BF16)"}.get(fmt, fmt)


_QUANTIZED = frozenset(FORMATS) - {NONE}
TARGETS: Mapping[str, Target] = MappingProxyType({
    "orin": Target("orin", "sm_87", frozenset({"int8_sq", NONE}), frozenset(),
                   "Jetson Orin (Ampere): TensorRT there has INT8 and FP16 kernels but no FP8 or FP4; "
                   "no fake quantization on-device (accuracy studies belong on a workstation)"),
    "thor": Target("thor", "sm_110", frozenset({"fp8", "nvfp4", "w4a8", "int8_sq", NONE}), frozenset(),
                   "Jetson Thor (Blackwell): FP8, NVFP4 and INT8 kernels"),
    "h100": Target("h100", "sm_90", frozenset({"fp8", "int8_sq", NONE}), frozenset({"nvfp4", "w4a8"}),
                   "Hopper: FP8 and INT8 kernels; FP4 only as fake quantization for accuracy studies"),
    "rtx-ada": Target("rtx-ada", "sm_89", frozenset({"fp8", "int8_sq", NONE}), frozenset({"nvfp4", "w4a8"}),
                      "Ada workstation GPUs, engines built with TensorRT-RTX: FP8 and INT8; FP4 only as fake "
                      "quantization for accuracy studies"),
    "cpu": Target("cpu", "n/a", frozenset({NONE}), _QUANTIZED,
                  "no low-precision kernels: every format runs as fake quantization, for accuracy studies",
                  emulation_only=True),
})


# The engine target names of ``blockpilot export --target`` (blockpilot.export.targets) whose gate has another name
# here, so ``quantize`` and ``export`` accept the same target names (a test keeps the two lists in step).
ALIASES: Mapping[str, str] = MappingProxyType({"rtx": "rtx-ada", "rtx-blackwell": "rtx-ada"})


def resolve_target(name: str | Target) -> Target:
    """The :class:`Target` called ``name`` (case-insensitive; an export target name resolves to its gate); a
    :class:`TargetError` lists the targets."""
    if isinstance(name, Target):
        return name
    key = name.strip().lower() if isinstance(name, str) else ""
    target = TARGETS.get(ALIASES.get(key, key))
    if target is None:
        raise TargetError(f"unknown target {name!r}; targets: {', '.join([*TARGETS, *ALIASES])}")
    return target


def _users(recipe: Recipe, fmt: str, names: list[str] | None) -> list[str]:
    """Modules (or, without module names, rule patterns) that would run ``fmt``."""
    users: list[str] = []
    if names is None:
        users += [r.pattern for r in recipe.rules if r.format == fmt]
        if recipe.auto is not None and fmt in recipe.auto.formats:
            users.append("every module the auto search may quantize")
        if recipe.kv_cache == fmt:
            users += [f"{p} (KV cache)" for p in KV_PROJECTIONS]
        return users
    plan = recipe.assign(names)
    candidate = recipe.auto is not None and fmt in recipe.auto.formats
    users += [n for n, f in plan.items() if f == fmt or (candidate and f == AUTO)]
    if recipe.kv_cache == fmt:
        kv = [n for n in names if n.endswith((".k_proj", ".v_proj"))]
        users += [f"{n} (KV cache)" for n in kv]
    return users


def _shown(users: list[str]) -> str:
    if not users:
        return "no module of this model"
    more = f" (+{len(users) - _SHOWN} more)" if len(users) > _SHOWN else ""
    return ", ".join(users[:_SHOWN]) + more


def check_recipe(recipe: Recipe, target: str | Target, *, allow_emulated: bool = False,
                 module_names: Iterable[str] | nn.Module | None = None) -> list[str]:
    """Notes on how ``recipe`` runs on ``target``; raises :class:`PrecisionNotSupportedError` when a
    format it uses is not real there and may not (or cannot) be emulated.

    ``module_names`` (or a model) lets the refusal name the modules; without it, rule patterns are named.
    On an emulation-only target (the CPU) fake quantization is implied and noted, never refused.
    """
    target = resolve_target(target)
    names = as_module_names(module_names)
    used = [f for f in recipe.formats_used if f != NONE]
    emulated = [f for f in used if f not in target.real_formats and f in target.emulated_formats]
    impossible = [f for f in used if f not in target.real_formats and f not in target.emulated_formats]
    may_emulate = allow_emulated or target.emulation_only
    refused = impossible + ([] if may_emulate else emulated)
    if refused:
        lines = [f"recipe {recipe.name!r} needs {', '.join(refused)}, which {target.name} ({target.sm}) "
                 "cannot run:"]
        lines += [f"  {f}: {_shown(_users(recipe, f, names))}" for f in refused]
        lines.append(f"{target.name} {target.supports()}. {target.notes}.")
        if emulated and not may_emulate:
            lines.append(f"Pass --allow-emulated (allow_emulated=True) to run {', '.join(emulated)} as fake "
                         "quantization for an accuracy study (no speed or memory gain).")
        raise PrecisionNotSupportedError("\n".join(lines))
    if not emulated:
        return []
    if target.emulation_only:
        verb = "runs" if len(emulated) == 1 else "run"
        return [f"{target.name} has no low-precision kernels: {', '.join(emulated)} {verb} as fake quantization "
                "(accuracy study only, no speed or memory gain)"]
    return [f"{f} runs as fake quantization on {target.name} ({target.sm}): accuracy study only, no speed or "
            "memory gain" for f in emulated]
