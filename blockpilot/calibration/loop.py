"""The calibration forward loop for Model Optimizer, and teacher-forced batches for loss-based tools.

:func:`make_forward_loop` runs the whole planner on every calibration observation, so the quantizers
observe what deployment runs: the chat prompt, the vision tower, the causal prefill and the
decoder's block-diffusion forwards (bidirectional drafts over answer blocks, causal verifies).

:func:`calibration_batches` gives, per observation, the prompt plus the planner's own answer as one
causal teacher-forced sequence; :func:`forward_step` and :func:`answer_loss` have the
``(model, batch)`` / ``(output, batch)`` shapes ``modelopt.torch.quantization.auto_quantize`` takes.
Those batches are causal only: they do not exercise the bidirectional block attention.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..progress_bars import live_bar
from ..runtime.plan_types import Observation, for_model
from ..runtime.planner import Planner
from ..vla.vision import image_inputs
from .sets import CalibrationError, CalibrationSet

IGNORE_INDEX = -100
PARSE_FAILURE_EXAMPLES = 5


def planner_model(planner: Planner) -> torch.nn.Module:
    """The torch module the planner's backend runs (``planner.backend.model``)."""
    model = getattr(planner.backend, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise CalibrationError(f"the planner's {type(planner.backend).__name__} holds no torch model "
                               "(backend.model); calibration needs the torch backend")
    return model


@dataclass
class LoopStats:
    """What the forward loop ran, summed over every call."""

    calls: int = 0
    plans: int = 0
    parse_failures: int = 0
    forwards: int = 0
    prefill_forwards: int = 0
    decode_forwards: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    failure_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}


class ForwardLoop:
    """``loop(model)`` plans every calibration observation with ``planner``; ``model`` must be the
    planner's own model (the one being quantized), else :class:`CalibrationError`. A planner error (a
    prompt too long for the cache, a bad observation) propagates; an answer that does not parse is
    counted in ``stats.parse_failures``."""

    def __init__(self, planner: Planner, calib: CalibrationSet, *, progress: bool = False) -> None:
        self.planner = planner
        self.model = planner_model(planner)
        self.sample_ids = [s.sample_id for s in calib.samples]
        self.observations = [for_model(obs, planner.config) for obs in calib.observations()]
        if not self.observations:
            raise CalibrationError("the calibration set is empty")
        self.progress = progress
        self.stats = LoopStats()

    def __call__(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            raise CalibrationError(
                f"the forward loop was made for the planner's model ({type(self.model).__name__} at "
                f"{id(self.model):#x}) but was called with another module ({type(model).__name__} at {id(model):#x}); "
                "quantize planner.backend.model itself so calibration runs the module the planner uses")
        stats = self.stats
        stats.calls += 1
        t0 = time.perf_counter()
        bar = live_bar(len(self.observations), "calibration", unit="plan", enabled=None if self.progress else False)
        with torch.inference_mode(), contextlib.closing(bar):
            for sample_id, obs in zip(self.sample_ids, self.observations, strict=True):
                plan = self.planner.plan(obs)
                stats.plans += 1
                stats.forwards += plan.stats.forwards
                stats.prefill_forwards += plan.stats.prefill_forwards
                stats.decode_forwards += plan.stats.decode_forwards
                stats.prompt_tokens += plan.stats.prompt_tokens
                stats.answer_tokens += plan.stats.tokens
                if plan.error is not None:
                    stats.parse_failures += 1
                    if len(stats.failure_examples) < PARSE_FAILURE_EXAMPLES:
                        stats.failure_examples.append(f"{sample_id}: {plan.error}")
                bar.set_postfix_str(f"{sample_id}: {plan.stats.forwards} forwards, "
                                    f"{'parsed' if plan.ok else 'parse failure'}", refresh=False)
                bar.update()
        stats.seconds += time.perf_counter() - t0


def make_forward_loop(planner: Planner, calib: CalibrationSet, *, progress: bool = False) -> ForwardLoop:
    """A ``forward_loop(model)`` for ``modelopt.torch.quantization.quantize``; read ``loop.stats`` after."""
    return ForwardLoop(planner, calib, progress=progress)


def calibration_batches(planner: Planner, calib: CalibrationSet) -> list[dict[str, Any]]:
    """:func:`observation_batches` over a calibration set's observations."""
    return observation_batches(planner, [for_model(s.observation(), planner.config) for s in calib.samples],
                               [s.sample_id for s in calib.samples])


def observation_batches(planner: Planner, observations: Sequence[Observation],
                        sample_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One teacher-forced batch (batch size 1) per observation:

    * ``input_ids`` ``(1, P + A)`` int64: the planner's prompt, then its greedy answer tokens (the
      configured decoder's answer row, full length: the scaffold decoders' fixed layout with padding);
    * ``labels`` ``(1, P + A)`` int64: :data:`IGNORE_INDEX` over the prompt, the answer ids after it
      (aligned with ``input_ids``; the logits at ``i`` predict the token at ``i + 1``);
    * ``pixel_values`` / ``grid_thw``: the preprocessed camera images, when the model has a vision tower;
    * ``prompt_length`` (P) and ``sample_id``.

    Plan with the full-precision model, so a search keeps what it says. Tensors sit on the model's
    device and are ordinary tensors (built outside inference mode), so a tool may backpropagate
    through a forward on them. The rollouts decoder samples; it is refused.
    """
    model = planner_model(planner)
    if planner.settings.name == "rollouts":
        raise CalibrationError("the rollouts decoder samples its answers; build the planner with a greedy decoder "
                               "(scaffold, ar or block) for teacher-forced batches")
    ids_for = list(sample_ids) if sample_ids is not None else [str(i) for i in range(len(observations))]
    if len(ids_for) != len(observations):
        raise CalibrationError(f"{len(ids_for)} sample ids for {len(observations)} observations")
    device = next(model.parameters()).device
    vision = planner.config.vision
    batches = []
    for obs, sample_id in zip(observations, ids_for, strict=True):
        prompt, _ = planner.prompt(obs)
        answer = np.asarray(planner.plan(obs).tokens[0], dtype=np.int64)
        ids = np.concatenate([prompt.token_ids, answer])
        labels = ids.copy()
        labels[: len(prompt)] = IGNORE_INDEX
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids)[None].to(device),
            "labels": torch.from_numpy(labels)[None].to(device),
            "prompt_length": len(prompt), "sample_id": sample_id,
        }
        if vision is not None and prompt.images:
            with torch.no_grad():
                patches, grid = image_inputs(list(prompt.images), vision)
            batch["pixel_values"], batch["grid_thw"] = patches.to(device), grid.to(device)
        batches.append(batch)
    return batches


def forward_step(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits ``(1, P + A, vocab)`` of a full causal forward over a :func:`calibration_batches` batch."""
    kwargs: dict[str, Any] = {}
    if "pixel_values" in batch:
        dtype = next(model.parameters()).dtype
        kwargs = {"pixel_values": batch["pixel_values"].to(dtype), "grid_thw": batch["grid_thw"]}
    hidden = model(batch["input_ids"], **kwargs)
    logits: torch.Tensor = model.logits(hidden)  # type: ignore[operator]
    return logits


def answer_loss(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of the answer tokens under teacher forcing (shifted by one position), summed over
    the answer: modelopt's auto_quantize scores layers by this loss's gradients, and a mean makes
    those scores so small (~1e-6 on the reference model) that its solver leaves budget unused."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="sum")
