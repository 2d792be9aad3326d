"""The task-independent half of training a block-diffusion VLA: the optimisation loop and the checkpoint it writes.

The driving reference (:mod:`.trainer`) and the SO-101 manipulation model (:mod:`.robot_trainer`) both run it on
their own example sets (anything with ``images``, ``prompts`` and ``answers`` rows) and evaluators. AdamW with a
warmup + cosine schedule and gradient clipping; bf16 autocast on CUDA, fp32 on the CPU. Every random draw (data
order, masks) comes from ``seed``, so a CPU run repeats exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from ..vla.loader import save_checkpoint
from ..vla.model import VLAModel
from ..vla.tokenizer import Tokenizer
from .objective import AnswerLayout, TrainBatch, block_diffusion_loss, make_batch, maskable
from .objective_config import ObjectiveConfig

IntArray = npt.NDArray[np.int64]


class Examples(Protocol):
    """What the loop reads of an example set: row ``i`` of each is example ``i``."""

    @property
    def images(self) -> npt.NDArray[np.uint8]: ...

    @property
    def prompts(self) -> tuple[npt.NDArray[np.int64], ...]: ...

    @property
    def answers(self) -> npt.NDArray[np.int64]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 2000
    batch: int = 8
    lr: float = 3e-3
    seed: int = 0
    warmup: int | None = None  # None: 5 % of the steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 250

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)


@dataclass(frozen=True, eq=False)
class LoopResult:
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    train_seconds: float


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to ``floor`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def example_batch(examples: Examples, idx: Sequence[int], layout: AnswerLayout, model: VLAModel,
                  objective: ObjectiveConfig, device: torch.device) -> TrainBatch:
    return make_batch([examples.images[i] for i in idx], [examples.prompts[i] for i in idx],
                      [examples.answers[i] for i in idx], layout, model.config, objective).to(device)


def optimise(model: VLAModel, train: Examples, layout: AnswerLayout, objective: ObjectiveConfig,
             config: OptimConfig, device: torch.device, evaluate: Callable[[], dict[str, Any]],
             log: Callable[[str], None] = print) -> LoopResult:
    """Run ``config.steps`` optimiser steps on ``train``; ``evaluate()`` every ``eval_every`` steps and at the end."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    steps, batch, warmup = config.steps, config.batch, config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    mask_gen = torch.Generator().manual_seed(config.seed + 2)
    order: list[int] = []
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    train_s = 0.0
    for step in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(train), generator=order_gen).tolist()
        idx, order = order[:batch], order[batch:]
        t_step = time.perf_counter()
        tb = example_batch(train, idx, layout, model, objective, device)
        with autocast(device):
            parts = block_diffusion_loss(model, tb, objective, mask_gen)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        optimizer.step()
        scheduler.step()
        train_s += time.perf_counter() - t_step
        history.append({"step": step + 1, "loss": parts.total.item(), "diffusion": float(parts.diffusion),
                        "ar": float(parts.ar), "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]})
        if (step + 1) % max(config.eval_every // 4, 1) == 0 or step == 0:
            log(f"step {step + 1}/{steps} loss {history[-1]['loss']:.4f} (diffusion {history[-1]['diffusion']:.4f},"
                f" ar {history[-1]['ar']:.4f}) {batch * (step + 1) / train_s:.2f} ex/s")
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            evals.append({"step": step + 1, **evaluate()})
            log(f"eval step {step + 1}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in evals[-1].items() if k != "step"))
    return LoopResult(history, evals, train_s)


def save_trained(root: Path, model: VLAModel, tokenizer: Tokenizer, trained_shape: tuple[int, ...]) -> VLAModel:
    """Write the fp32 checkpoint, its tokenizer and a ``preprocessor_config.json`` whose pixel budget is the
    trained frames' (larger frames are resized down to it); returns the model on the CPU in eval mode."""
    from ..vla.image_policy import ImagePolicy, write_preprocessor_config

    model_cpu = model.to("cpu", torch.float32).eval()
    save_checkpoint(model_cpu, root)
    tokenizer.save(root)
    vision = model_cpu.config.vision
    if vision is not None:
        trained = int(trained_shape[1] * trained_shape[2])
        write_preprocessor_config(root, ImagePolicy.for_vision(vision, max_pixels=max(trained, (
            vision.patch_size * vision.spatial_merge_size) ** 2), min_pixels=min(trained, 56 * 56)))
    return model_cpu


def run_metrics(config: OptimConfig, device: torch.device, model: VLAModel, result: LoopResult, *,
                train_examples: int, eval_examples: int, data_s: float, t_start: float) -> dict[str, Any]:
    """The run's summary numbers, as ``train_log.json`` and the data card record them."""
    tail = result.history[-min(len(result.history), 20):]
    return {
        "steps": config.steps, "batch": config.batch, "lr": config.lr, "seed": config.seed, "device": str(device),
        "warmup": config.warmup_steps, "train_examples": train_examples, "eval_examples": eval_examples,
        "data_seconds": round(data_s, 2), "train_seconds": round(result.train_seconds, 2),
        "examples_per_second": round(config.steps * config.batch / max(result.train_seconds, 1e-9), 3),
        "final_train_loss": float(np.mean([h["loss"] for h in tail])),
        "final_eval": result.evals[-1] if result.evals else {},
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }


def recipe(objective: ObjectiveConfig, config: OptimConfig, block_size: int) -> dict[str, Any]:
    return {"objective": {**asdict(replace(objective)), "section_weights": dict(objective.section_weights)},
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": config.weight_decay,
                          "grad_clip": config.grad_clip, "schedule": "linear warmup + cosine to 0.1 x lr"},
            "block_size": block_size}


def masked_answer_predictions(model: VLAModel, examples: Examples, answer_len: int, layout: AnswerLayout,
                              objective: ObjectiveConfig, device: torch.device, batch: int,
                              totals: dict[str, float]) -> Iterator[tuple[int, IntArray, IntArray]]:
    """The held-out pass both trainers score: batches through the block-diffusion loss with every answer block
    fully masked (one seeded view per example). Adds each batch's ``loss`` / ``diffusion`` / ``ar`` times its size
    into ``totals``; yields each example's index, the answer positions predicted (below ``answer_len``) and the
    predicted tokens there."""
    block = model.config.diffusion.block_size
    gen = torch.Generator().manual_seed(0)
    for lo in range(0, len(examples.answers), batch):
        idx = list(range(lo, min(lo + batch, len(examples.answers))))
        tb = example_batch(examples, idx, layout, model, objective, device)
        views = [[maskable(p, n, block)] for p, n in zip(tb.prompt_lens, tb.lengths, strict=True)]
        with autocast(device):
            parts = block_diffusion_loss(model, tb, objective, gen, views=views)
        for key, value in (("loss", parts.total), ("diffusion", parts.diffusion), ("ar", parts.ar)):
            totals[key] += float(value) * len(idx)
        rows, slots, pred = parts.rows.cpu().numpy(), parts.slots.cpu().numpy(), parts.predicted.cpu().numpy()
        for j, i in enumerate(idx):
            pos = slots[rows == j] - tb.prompt_lens[j]
            keep = pos < answer_len
            yield i, pos[keep], pred[rows == j][keep]
