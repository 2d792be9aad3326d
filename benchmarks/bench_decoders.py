"""Every decoder through the Planner on one model, in one run: forwards, wall time and their ratios to AR.

Decoders: scaffold-constrained AR (the baseline Fast-dDrive compares against), scaffold speculative,
shared-prefix rollouts, and free-text block threshold with the sub-block cache off and on. NFE
counts backend calls (prefill included); row_forwards weighs batched calls by their rows; ms is the
best of ``--repeats`` whole plans (prompt to parsed answer). Ratios are ``ar / decoder``: above 1
means fewer forwards or less time than AR. Compare numbers from the same run only.

Usage: ``.venv/bin/python benchmarks/bench_decoders.py [--checkpoint DIR] [--std 0.3] [--repeats 3] [--threads 1]``
(one thread gives steadier CPU numbers on a shared machine).
Without ``--checkpoint`` it uses the reference model with random weights drawn at ``--std`` (a
larger std gives peaked, input-dependent predictions, closer to what a trained model decodes like).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.vla.schema_io import load_schema

CASES: tuple[tuple[str, DecoderSettings], ...] = (
    ("ar (scaffold)", DecoderSettings(name="ar")),
    ("scaffold", DecoderSettings(name="scaffold")),
    ("rollouts N=4", DecoderSettings(name="rollouts", rollouts=4)),
    ("block 0.9", DecoderSettings(name="block", threshold=0.9)),
    ("block 0.9 +sub-cache", DecoderSettings(name="block", threshold=0.9, sub_block_cache=True)),
)


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    if args.checkpoint:
        from blockpilot.vla.loader import load_model, load_tokenizer

        model = load_model(Path(args.checkpoint), device=args.device)
        return model, load_tokenizer(Path(args.checkpoint), model.config), str(args.checkpoint)
    from blockpilot.vla.reference_model import build_reference_model

    model, tokenizer = build_reference_model(seed=args.seed, std=args.std)
    return model.to(args.device), tokenizer, f"reference model (random, std {args.std}, seed {args.seed})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="local HF checkpoint (default: the reference model)")
    parser.add_argument("--std", type=float, default=0.3, help="init std of the reference model's random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed plans per decoder (best is reported)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, what = _load(args)
    # A held-out generated scene: the input distribution the reference model is trained on.
    obs = observation(heldout_keyframes(1, stride=8)[1])
    schema = load_schema(args.checkpoint) if args.checkpoint else None
    rows = []
    for label, settings in CASES:
        planner = Planner.from_model(model, tokenizer, decoder=settings, schema=schema)
        plan = planner.plan(obs)  # warm-up; counts are deterministic
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            planner.plan(obs)
            best = min(best, (time.perf_counter() - t0) * 1e3)
        rows.append((label, plan, best))
    ar_nfe, ar_ms = rows[0][1].stats.forwards, rows[0][2]
    device = args.device if args.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{what}; {device}; prompt {rows[0][1].stats.prompt_tokens} tokens; best of {args.repeats}")
    print(f"{'decoder':<22}{'NFE':>6}{'row fw':>8}{'tokens':>8}{'tok/fw':>8}{'ms/plan':>10}"
          f"{'NFE ar/x':>10}{'ms ar/x':>9}  parsed")
    for label, plan, ms in rows:
        s = plan.stats
        parsed = "yes" if plan.ok else "no"
        if s.decoder == "rollouts":  # how many of the rollouts parsed
            parsed = f"{0 if plan.spread is None else plan.spread.count}/{s.rows}"
        print(f"{label:<22}{s.forwards:>6}{s.row_forwards:>8}{s.tokens:>8}{s.tokens_per_forward:>8.2f}{ms:>10.1f}"
              f"{ar_nfe / s.forwards:>10.2f}{ar_ms / ms:>9.2f}  {parsed}")


if __name__ == "__main__":
    main()
