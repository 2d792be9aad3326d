"""Per-layer sensitivity: quantize one module group at a time and measure what it does to the planner.

For every group (each decoder layer's attention and MLP, the vision blocks, the vision merger) a
fresh copy of the full-precision planner has only that group quantized in ``format`` (calibrated on
the calibration set through the real decode path), then both plan every calibration observation:

* **KL**: mean KL(fp32 || quantized) of the next-token distributions the LM head produces for the
  prompt's last position and the first block-diffusion step over the answer scaffold. Those two
  forwards see identical inputs in both models, so the divergence is the group's own doing.
* **L2 change**: mean distance (m) between the two planners' waypoints, over samples both parsed.
* **Token agreement**: the fraction of answer tokens that are equal.

:func:`demote_sensitive` turns the most sensitive groups of a recipe up to a wider format (``mixed``)
or out of the search (``auto``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..calibration.loop import make_forward_loop, planner_model
from ..calibration.sets import CalibrationSet
from ..runtime.planner import Planner
from .apply import quantize_model
from .recipes import FORMATS, NONE, PROTECTED, Recipe, RecipeError, Rule, quantizable_modules

DRAFT_CALLS = 2  # LM-head calls per plan with inputs that do not depend on the model: prefill, first block step


@dataclass(frozen=True)
class GroupSensitivity:
    group: str  # a module-name pattern, e.g. "lm.layers.2.mlp.*"
    modules: int
    kl: float
    l2_change_m: float | None
    token_agreement: float
    parse_failures: int


@dataclass(frozen=True)
class SensitivityReport:
    format: str
    samples: int
    groups: tuple[GroupSensitivity, ...]  # most sensitive (highest KL) first
    emulated: bool

    def most_sensitive(self, k: int) -> list[str]:
        return [g.group for g in self.groups[:k]]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "samples": self.samples, "emulated": self.emulated,
                "groups": [dataclasses.asdict(g) for g in self.groups]}

    def to_markdown(self) -> str:
        lines = [f"# Sensitivity to {self.format} ({self.samples} calibration samples"
                 f"{', NVFP4 emulated on CPU' if self.emulated else ''})", "",
                 "| group | modules | KL (nats) | L2 change (m) | token agreement | parse failures |",
                 "|---|---|---|---|---|---|"]
        for g in self.groups:
            l2 = "n/a" if g.l2_change_m is None else f"{g.l2_change_m:.3f}"
            lines.append(f"| `{g.group}` | {g.modules} | {g.kl:.2e} | {l2} | {g.token_agreement:.1%} | "
                         f"{g.parse_failures} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def module_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Group quantizable module names: per decoder layer attention / MLP, vision blocks, vision merger;
    the modules every recipe keeps unquantized are left out."""
    from fnmatch import fnmatch

    groups: dict[str, list[str]] = {}
    for name in names:
        if any(fnmatch(name, p) for p in PROTECTED):
            continue
        parts = name.split(".")
        if parts[:2] == ["lm", "layers"] and len(parts) > 3:
            key = ".".join(parts[:4]) + ".*"
        elif parts[0] == "visual" and len(parts) > 1:
            key = f"visual.{parts[1]}.*"
        else:
            key = name
        groups.setdefault(key, []).append(name)
    return groups


class _DraftLogits:
    """Keeps the LM head's first ``DRAFT_CALLS`` outputs of each plan (call :meth:`new_plan` between plans)."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.plans: list[list[torch.Tensor]] = []
        self._handle = head.register_forward_hook(self._hook)

    def new_plan(self) -> None:
        self.plans.append([])

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self.plans and len(self.plans[-1]) < DRAFT_CALLS:
            self.plans[-1].append(output.detach().float().reshape(-1, output.shape[-1]).clone())

    def close(self) -> None:
        self._handle.remove()


def _run(planner: Planner, observations: Sequence[Any]) -> tuple[list[list[torch.Tensor]], list[Any]]:
    model = planner_model(planner)
    head = model.get_submodule("lm.lm_head")
    capture = _DraftLogits(head)
    plans = []
    try:
        for obs in observations:
            capture.new_plan()
            plans.append(planner.plan(obs))
    finally:
        capture.close()
    return capture.plans, plans


def _kl(reference: list[list[torch.Tensor]], other: list[list[torch.Tensor]]) -> float:
    total, count = 0.0, 0
    for ref_calls, calls in zip(reference, other, strict=True):
        for r, q in zip(ref_calls, calls, strict=True):
            lp, lq = torch.log_softmax(r, -1), torch.log_softmax(q, -1)
            total += float((lp.exp() * (lp - lq)).sum(-1).sum())
            count += r.shape[0]
    return total / max(count, 1)


def sensitivity_report(make_planner: Callable[[], Planner], calib: CalibrationSet, fmt: str,
                       groups: dict[str, list[str]] | None = None) -> SensitivityReport:
    """Quantize each group alone in ``fmt`` on a fresh planner from ``make_planner`` and measure it."""
    if fmt not in FORMATS or fmt == NONE:
        raise RecipeError(f"sensitivity needs a quantized format, one of {sorted(set(FORMATS) - {NONE})}; got {fmt!r}")
    observations = calib.observations()
    base = make_planner()
    ref_logits, ref_plans = _run(base, observations)
    groups = groups if groups is not None else module_groups(quantizable_modules(planner_model(base)))
    results, emulated = [], False
    for pattern, members in groups.items():
        planner = make_planner()
        recipe = Recipe(f"sensitivity:{pattern}", (Rule(pattern, fmt),), FORMATS[fmt].algorithm)
        report = quantize_model(planner_model(planner), recipe.modelopt_config(quantizable_modules(
            planner_model(planner))), make_forward_loop(planner, calib))
        emulated |= report.emulated
        logits, plans = _run(planner, observations)
        moved = [float(np.linalg.norm(p.waypoints - r.waypoints, axis=-1).mean())
                 for p, r in zip(plans, ref_plans, strict=True) if p.ok and r.ok]
        same = [float((p.tokens[0] == r.tokens[0]).mean()) for p, r in zip(plans, ref_plans, strict=True)
                if p.tokens.shape == r.tokens.shape]
        results.append(GroupSensitivity(pattern, len(members), _kl(ref_logits, logits),
                                        float(np.mean(moved)) if moved else None,
                                        float(np.mean(same)) if same else 0.0, sum(not p.ok for p in plans)))
    results.sort(key=lambda g: -g.kl)
    return SensitivityReport(fmt, len(observations), tuple(results), emulated)


def demote_sensitive(recipe: Recipe, report: SensitivityReport, k: int, to: str = "fp8") -> Recipe:
    """``recipe`` with the ``k`` most sensitive groups of ``report`` in ``to`` (rule recipes) or kept
    out of the search (auto recipes)."""
    if k <= 0:
        return recipe
    picked = report.most_sensitive(k)
    if recipe.auto is not None:
        auto = dataclasses.replace(recipe.auto, excluded=(*recipe.auto.excluded, *picked))
        return dataclasses.replace(recipe, auto=auto, description=f"{recipe.description}; kept out: {picked}")
    rules = tuple(Rule(p, to) for p in picked)
    # Protected modules stay last so a broad group pattern cannot re-enable them.
    protected = tuple(r for r in recipe.rules if r.pattern in PROTECTED)
    others = tuple(r for r in recipe.rules if r.pattern not in PROTECTED)
    return dataclasses.replace(recipe, rules=(*others, *rules, *protected),
                               description=f"{recipe.description}; {to} for the {k} most sensitive: {picked}")
