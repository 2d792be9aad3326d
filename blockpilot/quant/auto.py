"""Per-layer format search under an effective-bits budget with ``mtq.auto_quantize``.

Model Optimizer scores every searchable group of linear layers (q/k/v together, gate/up together)
by how much each candidate format perturbs the loss (``method="gradient"``: a Fisher-style score
from one backward pass per batch, which runs on CPU) and picks per group the format that minimises
the summed score while the weight bits stay within the budget. Its cost model counts weights only:
``numel * effective_bits`` over ``numel * 16``; a layer left unquantized costs 16 bits.

Disabled layers (by default the tied LM head and the vision tower, as the default PTQ configs
leave them) stay unquantized. With ``count_disabled=False`` they are also left out of the budget,
so the bits describe the searched decoder layers; with ``True`` they count at 16 bits each.

The calibration data is the planner's own traffic: :func:`blockpilot.calibration.loop.observation_batches`
builds prompt + answer token ids (with the camera images) per observation, the answer being the
unquantized model's own plan, and :func:`~blockpilot.calibration.loop.answer_loss` is the
teacher-forced next-token cross-entropy over the answer tokens in causal mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, cast

import torch
from torch import nn

from ..calibration.loop import answer_loss, forward_step
from .apply import is_emulated, jsonable, precision_map, prepare_emulation, quantizer_label

DEFAULT_DISABLED_LAYERS = ("*lm_head*", "*visual*")
UNQUANTIZED_BITS = 16.0  # what modelopt charges a layer left in high precision


def weight_bits(quantizer: nn.Module | None) -> float:
    """Stored bits per weight of a weight quantizer's format: element bits plus the per-block scale
    spread over its block (E4M3 for NVFP4, E8M0 for MX, 16 bits where the config names none);
    :data:`UNQUANTIZED_BITS` when disabled."""
    from modelopt.torch.quantization.nn import SequentialQuantizer

    if quantizer is None:
        return UNQUANTIZED_BITS
    if isinstance(quantizer, SequentialQuantizer):
        return min((weight_bits(q) for q in quantizer), default=UNQUANTIZED_BITS)
    if not getattr(quantizer, "is_enabled", False):
        return UNQUANTIZED_BITS
    num_bits: Any = getattr(quantizer, "num_bits", None)
    bits = float(sum(num_bits) + 1 if isinstance(num_bits, (tuple, list)) else num_bits)
    blocks: Any = getattr(quantizer, "block_sizes", None) or {}
    block = blocks.get(-1)
    if block:
        scale = blocks.get("scale_bits")
        scale_bits = float(sum(scale) + 1) if isinstance(scale, (tuple, list)) else UNQUANTIZED_BITS
        bits += scale_bits / float(block)
    return bits


@dataclass(frozen=True)
class AutoResult:
    """The searched model's formats and what they cost."""

    precision: dict[str, dict[str, str]]  # every enabled quantizer after the search
    chosen: dict[str, str]  # searchable module -> weight format, "none" when left unquantized
    disabled: tuple[str, ...]  # searchable modules the disabled_layers patterns kept out
    budget: float
    effective_bits: float  # computed here from the chosen formats over the budgeted modules
    modelopt_effective_bits: float  # what the search reported
    effective_bits_all: float  # over every searchable module, disabled ones at 16 bits
    emulated: bool
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "budget": self.budget, "effective_bits": self.effective_bits,
            "modelopt_effective_bits": self.modelopt_effective_bits, "effective_bits_all": self.effective_bits_all,
            "emulated": self.emulated, "chosen": self.chosen, "disabled": list(self.disabled),
            "precision": self.precision, "search": self.search,
        })


def _resolve(fmt: dict[str, Any] | str) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    if isinstance(fmt, str):
        config = getattr(mtq, fmt, None)
        if not isinstance(config, dict):
            raise ValueError(f"unknown modelopt format {fmt!r}; choose from {sorted(mtq.config.choices)}")
        return config
    return fmt


def _summary(state: dict[str, Any], weights: dict[str, int]) -> dict[str, Any]:
    best = state.get("best", {})
    groups = {}
    for key, stats in state.get("candidate_stats", {}).items():
        groups[key.removesuffix(".quant_recipe")] = {
            "modules": list(stats.get("module_names", [])),
            "weights": sum(weights.get(m, 0) for m in stats.get("module_names", [])),
            "cost_weight": float(stats.get("cost_weight", 1.0)),
            "formats": [str(f) for f in stats.get("formats", [])],
            "scores": [float(s) for s in stats.get("scores", [])],
            "chosen": str(best.get("recipe", {}).get(key, "")),
        }
    return {"method": state.get("method"), "cost_model": state.get("cost_model"),
            "is_satisfied": bool(best.get("is_satisfied", False)), "score": float(best.get("score", float("nan"))),
            "groups": groups}


def _bits_over(modules: Sequence[str], weights: dict[str, int], bits: dict[str, float]) -> float:
    total = sum(weights[m] for m in modules)
    return sum(weights[m] * bits[m] for m in modules) / total if total else float("nan")


def auto_quantize_model(
    model: nn.Module,
    *,
    formats: Sequence[dict[str, Any] | str],
    effective_bits: float,
    batches: Sequence[Any],
    forward_step: Callable[[nn.Module, Any], Any] = forward_step,
    loss_func: Callable[[Any, Any], torch.Tensor] = answer_loss,
    num_calib_steps: int | None = None,
    num_score_steps: int | None = None,
    disabled_layers: Sequence[str] = DEFAULT_DISABLED_LAYERS,
    count_disabled: bool = False,
    method: str = "gradient",
    verbose: bool = False,
) -> AutoResult:
    """Search per-layer formats among ``formats`` (modelopt configs or their names, e.g.
    ``"NVFP4_DEFAULT_CFG"``; "no quantization" is always a candidate) for at most ``effective_bits``
    bits per weight, quantizing ``model`` in place. ``batches`` feed both calibration and scoring
    (``num_*_steps`` default to all of them)."""
    import modelopt.torch.quantization as mtq

    if not formats:
        raise ValueError("auto_quantize needs at least one candidate format")
    if not batches:
        raise ValueError("auto_quantize needs calibration batches")
    prepare_emulation(model, [_resolve(f) for f in formats])
    disabled = list(disabled_layers)
    constraints: dict[str, Any] = {"effective_bits": float(effective_bits)}
    if disabled and not count_disabled:
        constraints["cost"] = {"excluded_module_name_patterns": disabled}
    was_training = model.training
    model, state = mtq.auto_quantize(
        model, constraints=constraints, quantization_formats=list(formats), data_loader=list(batches),
        forward_step=forward_step, loss_func=loss_func, disabled_layers=disabled or None,
        num_calib_steps=num_calib_steps or len(batches), num_score_steps=num_score_steps or len(batches),
        method=method, verbose=verbose)
    model.train(was_training)

    stats = state.get("candidate_stats", {})
    weights: dict[str, int] = {}
    bits: dict[str, float] = {}
    chosen: dict[str, str] = {}
    budgeted: list[str] = []
    excluded: list[str] = []
    for group in stats.values():
        names = list(group.get("module_names", []))
        # modelopt disables a whole group when any member matches a pattern; so does this.
        is_disabled = any(fnmatch(name, pattern) for name in names for pattern in disabled)
        for name in names:
            module = model.get_submodule(name)
            quantizer = getattr(module, "weight_quantizer", None)
            weights[name] = int(cast(torch.Tensor, module.weight).numel())
            bits[name] = weight_bits(quantizer)
            chosen[name] = (quantizer_label(quantizer) if quantizer is not None else None) or "none"
            if is_disabled:
                excluded.append(name)
            else:
                budgeted.append(name)
    counted = budgeted + (excluded if count_disabled else [])
    reported = float(state.get("best", {}).get("constraints", {}).get("effective_bits", float("nan")))
    precision = precision_map(model)
    return AutoResult(
        precision=precision, chosen=chosen, disabled=tuple(excluded), budget=float(effective_bits),
        effective_bits=_bits_over(counted, weights, bits), modelopt_effective_bits=reported,
        effective_bits_all=_bits_over(budgeted + excluded, weights, bits), emulated=is_emulated(model, precision),
        search=_summary(state, weights))
