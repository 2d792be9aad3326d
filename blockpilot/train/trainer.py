"""Train the reference model on synthetic scenes and write it as a checkpoint the loader reads.

AdamW with a warmup + cosine schedule and gradient clipping; bf16 autocast on CUDA, fp32 on the
CPU. Every random draw (weights, data order, masks) comes from ``seed``, so a CPU run repeats
exactly. The output directory holds the HF-layout checkpoint, ``tokenizer.json``,
``blockpilot.json`` (answer schema and provenance), ``train_log.json`` and ``DATA_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_io import atomic_write
from ..vla.model import VLAModel
from ..vla.plans import DrivingPlan, DrivingSchema
from ..vla.reference_model import init_weights, reference_config, reference_schema
from ..vla.reference_tokenizer import build_reference_tokenizer
from ..vla.scaffold import Scaffold, build_scaffold
from ..vla.schema_io import save_schema
from .card import write_data_card
from .data import CameraFn, ExampleSet, KeyframesFn, SceneFn, answer_sections, build_examples
from .loop import OptimConfig, masked_answer_predictions, optimise, recipe, run_metrics, save_trained
from .objective import AnswerLayout
from .objective_config import ObjectiveConfig
from .options import EVAL_SEED_BASE, add_arguments, parse_seeds


@torch.no_grad()
def evaluate(model: VLAModel, examples: ExampleSet, scaffold: Scaffold[DrivingPlan], layout: AnswerLayout,
             objective: ObjectiveConfig, device: torch.device, batch: int = 8) -> dict[str, float | None]:
    """Held-out losses and one-step, teacher-forced accuracy with every answer block fully masked.

    ``acc_<section>``: share of value tokens (slots, null padding included) predicted right;
    ``traj_ade_m``: mean waypoint error of the
    predicted trajectory slots read back (other sections from the label; ``traj_parse_fail``: the
    share unreadable); ``parse_fail``: share of answers unreadable with every slot predicted.
    """
    model.eval()
    value_tokens = (layout.section_ids == layout.names.index("trajectory")) & ~layout.frozen
    sections = len(layout.names)
    totals = {"loss": 0.0, "diffusion": 0.0, "ar": 0.0}
    correct, counted = np.zeros(sections), np.zeros(sections)
    parse_fail = traj_fail = 0
    errors: list[float] = []
    for i, pos, guess in masked_answer_predictions(model, examples, len(scaffold), layout, objective, device, batch,
                                                   totals):
        answer = examples.answers[i][:len(scaffold)]
        full = scaffold.token_ids.copy()  # every slot from the predictions
        full[pos[~scaffold.frozen[pos]]] = guess[~scaffold.frozen[pos]]
        traj_only = answer.copy()  # the trajectory from the predictions, the rest from the label
        traj_only[pos[value_tokens[pos]]] = guess[value_tokens[pos]]
        values = ~scaffold.frozen[pos]
        section = layout.section_ids[pos][values]
        correct += np.bincount(section, weights=guess[values] == answer[pos][values], minlength=sections)
        counted += np.bincount(section, minlength=sections)
        parse_fail += not _parses(scaffold, full)
        if _parses(scaffold, traj_only):
            waypoints = scaffold.decode_plan(traj_only).waypoints
            errors.append(float(np.linalg.norm(waypoints - examples.waypoints[i], axis=1).mean()))
        else:
            traj_fail += 1
    model.train()
    n = len(examples)
    accuracy = {f"acc_{name}": float(c / k) for name, c, k in zip(layout.names, correct, counted, strict=True) if k}
    return {**{k: v / n for k, v in totals.items()}, **accuracy,
            "traj_ade_m": float(np.mean(errors)) if errors else None, "traj_parse_fail": traj_fail / n,
            "parse_fail": parse_fail / n}


def _parses(scaffold: Scaffold[DrivingPlan], ids: np.ndarray) -> bool:
    try:
        scaffold.decode_plan(ids)
    except ValueError:
        return False
    return True


def train_reference(
    out_dir: str | Path,
    train_seeds: Sequence[int],
    steps: int = 2000,
    batch: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | None = None,
    *,
    eval_seeds: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    eval_every: int = 250,
    max_eval_examples: int = 64,
    keyframe_stride: int = 2,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    objective: ObjectiveConfig | None = None,
    schema: DrivingSchema | None = None,
    sim: tuple[SceneFn, KeyframesFn, CameraFn] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the reference VLA with the block-diffusion objective; returns the run's metrics."""
    t_start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    objective = objective or ObjectiveConfig()
    schema = schema or reference_schema()
    eval_seeds = list(eval_seeds) if eval_seeds is not None else [EVAL_SEED_BASE + seed + i for i in range(8)]
    if set(eval_seeds) & set(train_seeds):
        raise ValueError("eval_seeds overlap train_seeds; held-out scenes must be unseen")
    torch.manual_seed(seed)
    tokenizer, tokens = build_reference_tokenizer()
    model = VLAModel(reference_config(tokenizer.vocab_size, tokens))
    init_weights(model, seed=seed)
    model.to(dev).train()
    scaffold = build_scaffold(schema, tokenizer)
    names, section_ids, frozen = answer_sections(scaffold)
    layout = AnswerLayout(names, section_ids, frozen)
    vision = model.config.vision
    assert vision is not None  # the reference model is a VLA
    t0 = time.perf_counter()
    train = build_examples(train_seeds, tokenizer, scaffold, vision, cache_dir=cache_dir, stride=keyframe_stride,
                           sim=sim)
    held_out = build_examples(eval_seeds, tokenizer, scaffold, vision, cache_dir=cache_dir, stride=keyframe_stride,
                              sim=sim)
    held_out = held_out.subset(max_eval_examples)
    data_s = time.perf_counter() - t0
    log(f"data: {len(train)} train / {len(held_out)} held-out examples in {data_s:.1f} s")

    config = OptimConfig(steps=steps, batch=batch, lr=lr, seed=seed, warmup=warmup, weight_decay=weight_decay,
                         grad_clip=grad_clip, eval_every=eval_every)
    result = optimise(model, train, layout, objective, config, dev,
                      lambda: evaluate(model, held_out, scaffold, layout, objective, dev, batch), log)
    root = Path(out_dir)
    model = save_trained(root, model, tokenizer, train.images.shape)
    metrics = run_metrics(config, dev, model, result, train_examples=len(train), eval_examples=len(held_out),
                          data_s=data_s, t_start=t_start)
    run_recipe = recipe(objective, config, model.config.diffusion.block_size)
    save_schema(root, schema, training={"recipe": run_recipe, "metrics": metrics, "train_stats": train.stats,
                                        "eval_stats": held_out.stats})
    atomic_write(root / "train_log.json", json.dumps({"metrics": metrics, "recipe": run_recipe,
                                                       "history": result.history, "evals": result.evals},
                                                      indent=1) + "\n")
    write_data_card(root / "DATA_CARD.md", train_seeds, eval_seeds, train.stats, held_out.stats, run_recipe, metrics)
    log(f"wrote {root} ({metrics['examples_per_second']} ex/s, final loss {metrics['final_train_loss']:.4f})")
    return metrics


def run(args: argparse.Namespace) -> int:
    train_reference(args.out, parse_seeds(args.train_seeds), steps=args.steps, batch=args.batch, lr=args.lr,
                    seed=args.seed, device=args.device,
                    eval_seeds=parse_seeds(args.eval_seeds) if args.eval_seeds else None,
                    cache_dir=args.cache_dir or None, eval_every=args.eval_every, keyframe_stride=args.keyframe_stride,
                    objective=ObjectiveConfig(ar_weight=args.ar_weight))
    return 0


def main_train_reference(argv: Sequence[str] | None = None) -> int:
    """``blockpilot train-reference ...`` as a function of its arguments."""
    p = argparse.ArgumentParser(prog="blockpilot train-reference",
                                description="Train the reference block-diffusion VLA on synthetic scenes.")
    add_arguments(p)
    return run(p.parse_args(argv))
