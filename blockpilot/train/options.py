"""The ``train-reference`` options: torch-free, so ``blockpilot --help`` and every other command build their
parser on a machine without torch (the car)."""

from __future__ import annotations

import argparse

from .objective_config import ObjectiveConfig

EVAL_SEED_BASE = 1_000_000  # held-out scenes are drawn far from the training seeds


def parse_seeds(text: str) -> list[int]:
    """``"0:200"`` (a range), ``"3,5,9"`` or ``"40"`` (that many scenes from seed 0)."""
    if ":" in text:
        lo, hi = (int(x) for x in text.split(":"))
        return list(range(lo, hi))
    if "," in text:
        return [int(x) for x in text.split(",")]
    return list(range(int(text)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train-reference`` options, for the CLI's subcommand parser."""
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--train-seeds", default="0:320", help="scene seeds: 'lo:hi', 'a,b,c' or a count")
    p.add_argument("--eval-seeds", default=None, help=f"held-out scene seeds (default: 8 from {EVAL_SEED_BASE})")
    p.add_argument("--keyframe-stride", type=int, default=2, help="use every n-th 2 Hz keyframe of a scene")
    p.add_argument("--cache-dir", default="runs/cache/examples", help="tokenized example cache ('' to disable)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--ar-weight", type=float, default=ObjectiveConfig.ar_weight, help="auxiliary causal loss weight")
