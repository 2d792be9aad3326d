"""Train the SO-101 manipulation model (``blockpilot train-robot``): the reference architecture, the so101-ee
action-chunk answer, the same block-diffusion objective and optimisation loop as the driving reference.

The output directory is a checkpoint the planner opens like any other (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``preprocessor_config.json``, ``blockpilot.json`` with the so101-ee schema) plus
``train_log.json`` and ``DATA_CARD.md``. Held-out numbers measured afterwards (replay L1 against the
repeat-last-action baseline, closed-loop success) are added to both by :func:`~.robot_card.record_results`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_io import atomic_write
from ..vla.model import VLAModel
from ..vla.plans import ActionChunkPlan, ActionChunkSchema
from ..vla.reference_model import init_weights, reference_config
from ..vla.reference_tokenizer import build_reference_tokenizer
from ..vla.scaffold import Scaffold, build_scaffold
from ..vla.schema_io import save_schema
from .data import answer_sections
from .loop import OptimConfig, masked_answer_predictions, optimise, recipe, run_metrics, save_trained
from .objective import AnswerLayout
from .objective_config import ObjectiveConfig
from .options import parse_seeds
from .robot_card import write_robot_card
from .robot_dagger import DaggerData, init_record, load_init, policy_rollouts
from .robot_data import RobotExampleSet, RolloutConfig, RolloutFn, build_robot_examples

ROBOT_EVAL_SEED_BASE = 1_000_000  # held-out episodes are drawn far from the training seeds
ROBOT_SECTION_WEIGHTS = {"actions": 1.0, "end": 1.0}


@torch.no_grad()
def evaluate_robot(model: VLAModel, examples: RobotExampleSet, scaffold: Scaffold[ActionChunkPlan],
                   layout: AnswerLayout, objective: ObjectiveConfig, device: torch.device,
                   batch: int = 8) -> dict[str, Any]:
    """Held-out losses and one-step, teacher-forced predictions with every answer block fully masked.

    ``acc_actions``: share of the chunk's value tokens predicted right; ``l1``: mean absolute error of the
    predicted chunk read back (rows past the episode's end not scored); ``l1_repeat_last``: the same for repeating
    the previous frame's action (frames with a previous one, examples of one episode in order); ``parse_fail``:
    share of answers unreadable.
    """
    model.eval()
    totals = {"loss": 0.0, "diffusion": 0.0, "ar": 0.0}
    correct = counted = parse_fail = 0
    errors: list[float] = []
    baseline: list[float] = []
    for i, pos, guess in masked_answer_predictions(model, examples, len(scaffold), layout, objective, device, batch,
                                                   totals):
        values = ~scaffold.frozen[pos]
        full = scaffold.token_ids.copy()
        full[pos[values]] = guess[values]
        correct += int((guess[values] == examples.answers[i][pos[values]]).sum())
        counted += int(values.sum())
        keep = ~examples.pad[i]
        try:
            chunk = scaffold.decode_plan(full).actions
        except ValueError:
            parse_fail += 1
        else:
            errors.append(float(np.abs(chunk - examples.actions[i])[keep].mean()))
        if examples.frames[i] > 0 and i > 0 and examples.seeds[i - 1] == examples.seeds[i]:
            previous = examples.actions[i - 1][0]
            baseline.append(float(np.abs(examples.actions[i] - previous)[keep].mean()))
    model.train()
    n = len(examples)
    return {**{k: v / n for k, v in totals.items()}, "acc_actions": correct / max(counted, 1),
            "l1": float(np.mean(errors)) if errors else None,
            "l1_repeat_last": float(np.mean(baseline)) if baseline else None, "parse_fail": parse_fail / n}


ROBOT_SCHEMAS = {"so101-ee": ActionChunkSchema.so101_ee, "so101-ee-block": ActionChunkSchema.so101_ee_block}


def train_robot(
    out_dir: str | Path,
    train_seeds: Sequence[int],
    config: OptimConfig | None = None,
    device: str | None = None,
    *,
    eval_seeds: Sequence[int] | None = None,
    rollout: RolloutConfig | None = None,
    cache_dir: str | Path | None = None,
    max_eval_examples: int = 128,
    objective: ObjectiveConfig | None = None,
    rollouts: RolloutFn | None = None,
    schema: ActionChunkSchema | None = None,
    init: str | Path | None = None,
    dagger: DaggerData | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the SO-101 model on expert rollouts of ``train_seeds`` to answer ``schema`` (default ``so101-ee``:
    the joints only); returns the run's metrics. ``init``: start from that checkpoint's weights instead of a fresh
    initialisation; ``dagger``: add the rollouts its policy drives, labelled by the expert (:mod:`.robot_dagger`)."""
    t_start = time.perf_counter()
    config = config or OptimConfig()
    rollout = rollout or RolloutConfig()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    objective = objective or ObjectiveConfig(section_weights=dict(ROBOT_SECTION_WEIGHTS))
    schema = schema or ActionChunkSchema.so101_ee()
    eval_seeds = list(eval_seeds) if eval_seeds is not None else [ROBOT_EVAL_SEED_BASE + i for i in range(16)]
    if set(eval_seeds) & set(train_seeds):
        raise ValueError("eval_seeds overlap train_seeds; held-out episodes must be unseen")
    torch.manual_seed(config.seed)
    tokenizer, tokens = build_reference_tokenizer()
    if init is None:
        model = VLAModel(reference_config(tokenizer.vocab_size, tokens))
        init_weights(model, seed=config.seed)
    else:
        model = load_init(init, tokenizer, schema)
    model.to(dev).train()
    scaffold = build_scaffold(schema, tokenizer)
    layout = AnswerLayout(*answer_sections(scaffold))
    vision = model.config.vision
    assert vision is not None  # the reference model is a VLA
    t0 = time.perf_counter()
    train = build_robot_examples(train_seeds, tokenizer, scaffold, vision, rollout, train=True, cache_dir=cache_dir,
                                 rollouts=rollouts, log=log)
    provenance_dagger: dict[str, Any] = {}
    if dagger is not None:
        visited = build_robot_examples(dagger.seeds, tokenizer, scaffold, vision, rollout, train=False,  # no DART
                                       cache_dir=cache_dir,
                                       rollouts=policy_rollouts(dagger.policy, dagger.max_steps),
                                       source=dagger.source, log=log)
        provenance_dagger = {"dagger": {**dagger.describe(), "stats": visited.stats}}
        train = train + visited
    held_out = build_robot_examples(eval_seeds, tokenizer, scaffold, vision, rollout, train=False,
                                    cache_dir=cache_dir, rollouts=rollouts, log=log)
    held_out = held_out if len(held_out) <= max_eval_examples else _first_episodes(held_out, max_eval_examples)
    data_s = time.perf_counter() - t0
    log(f"data: {len(train)} train / {len(held_out)} held-out examples in {data_s:.1f} s")

    result = optimise(model, train, layout, objective, config, dev,
                      lambda: evaluate_robot(model, held_out, scaffold, layout, objective, dev, config.batch), log)
    root = Path(out_dir)
    model = save_trained(root, model, tokenizer, train.images.shape)
    metrics = {**run_metrics(config, dev, model, result, train_examples=len(train), eval_examples=len(held_out),
                             data_s=data_s, t_start=t_start), "threads": torch.get_num_threads(),
               "eval_every": config.eval_every}
    run_recipe = {**recipe(objective, config, model.config.diffusion.block_size), "rollout": asdict(rollout)}
    expert_stats = train.stats["parts"][0] if "parts" in train.stats else train.stats
    provenance = {"train_seeds": _spec(train_seeds), "eval_seeds": _spec(eval_seeds), "train_stats": expert_stats,
                  **provenance_dagger, **({"init": init_record(init)} if init is not None else {}),
                  "eval_stats": held_out.stats, "state_dims": list(schema.state_dims),
                  "schema_preset": next((n for n, f in ROBOT_SCHEMAS.items() if f() == schema), "custom")}
    save_schema(root, schema, training={"recipe": run_recipe, "metrics": metrics, **provenance})
    atomic_write(root / "train_log.json", json.dumps({"metrics": metrics, "recipe": run_recipe, **provenance,
                                                       "history": result.history, "evals": result.evals},
                                                      indent=1) + "\n")
    write_robot_card(root)
    log(f"wrote {root} ({metrics['examples_per_second']} ex/s, final loss {metrics['final_train_loss']:.4f})")
    return metrics


def _first_episodes(examples: RobotExampleSet, count: int) -> RobotExampleSet:
    """The first ``count`` examples (whole leading episodes stay in order, so repeat-last-action can be scored)."""
    keep = np.arange(count)
    return RobotExampleSet(examples.images[keep], examples.prompts[:count], examples.answers[keep],
                           examples.seeds[keep], examples.frames[keep], examples.actions[keep], examples.pad[keep],
                           {**examples.stats, "examples": count})


def _spec(seeds: Sequence[int]) -> str:
    from .card import seed_spec

    return seed_spec(seeds)


def run(args: argparse.Namespace, open_policy: Callable[[str, int], Any] | None = None) -> int:
    if args.record:
        from .robot_card import record_results

        record_results(Path(args.out), args.record)
        return 0
    config = OptimConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, eval_every=args.eval_every)
    rollout = RolloutConfig(task=args.task, dart_noise=args.dart_noise, dart_fraction=args.dart_fraction)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        train_robot(args.out, parse_seeds(args.train_seeds), config, args.device,
                    eval_seeds=parse_seeds(args.eval_seeds), rollout=rollout, cache_dir=args.cache_dir or None,
                    objective=ObjectiveConfig(section_weights=dict(ROBOT_SECTION_WEIGHTS), ar_weight=args.ar_weight),
                    schema=ROBOT_SCHEMAS[args.schema](), init=args.init, dagger=_dagger(args, open_policy))
    finally:
        torch.set_num_threads(threads)
    return 0


def _dagger(args: argparse.Namespace, open_policy: Callable[[str, int], Any] | None) -> DaggerData | None:
    if not args.dagger:
        return None
    if open_policy is None:
        raise ValueError("--dagger needs a policy opener (blockpilot's CLI passes the evaluator's)")
    return DaggerData(open_policy(args.dagger, args.dagger_execute), args.dagger, tuple(parse_seeds(args.dagger_seeds)),
                      args.dagger_execute, args.dagger_max_steps)
