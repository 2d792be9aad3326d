"""FlashBlock-style prefix reuse (``CudaBackend(prefix_reuse=True)``) against the plain forward, on one run.

For the block threshold and scaffold decoders (and AR, the scaffold's reference): over held-out observations,
the share of plans identical with reuse on and off, plans that fail to parse, forwards per plan, and ms per plan
(mean of one plan per observation), on ``device="cpu"`` with the torch reference attention unless ``--device
cuda`` (reuse steps always run eagerly, in torch attention math). Reuse is an APPROXIMATION: a later draft at the
same window keeps the first draft's prefix attention. Compare numbers from the same run only.

Usage: ``.venv/bin/python benchmarks/bench_prefix_reuse.py [--observations 8] [--threads 1] [--device cpu]``
(the shipped reference model, ``models/reference``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.runtime.cuda_backend import CudaBackend
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.plans import DrivingSchema
from blockpilot.vla.reference_model import SHIPPED_MODEL
from blockpilot.vla.schema_io import load_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(SHIPPED_MODEL, device=args.device)
    tokenizer = load_tokenizer(SHIPPED_MODEL, model.config)
    schema = load_schema(SHIPPED_MODEL)  # the checkpoint's answer schema
    assert isinstance(schema, DrivingSchema)
    keys = heldout_keyframes(args.observations, stride=8)[: args.observations]
    graphs = args.device != "cpu"
    plans: dict[tuple[str, bool], list] = {}
    print(f"{len(keys)} observations, device {args.device}")
    print(f"{'decoder':<10} {'reuse':<6} {'identical':>9} {'errors':>6} {'forwards':>9} {'ms/plan':>9}")
    for name in ("ar", "scaffold", "block"):
        settings = DecoderSettings(name=name)
        capacity = Planner.from_model(model, tokenizer, decoder=settings, schema=schema).backend.capacity
        for reuse in (False, True) if name != "ar" else (False,):
            backend = CudaBackend(model, capacity, device=args.device, graphs=graphs, prefix_reuse=reuse)
            planner = Planner(backend, model.config, tokenizer, decoder=settings, schema=schema)
            planner.plan(observation(keys[0]))  # warm-up
            t0 = time.perf_counter()
            got = [planner.plan(observation(key)) for key in keys]
            ms = (time.perf_counter() - t0) * 1e3 / len(keys)
            plans[name, reuse] = got
            same = sum(np.array_equal(a.tokens, b.tokens) for a, b in zip(plans[name, False], got, strict=True))
            errors = sum(p.error is not None for p in got)
            forwards = float(np.mean([p.stats.forwards for p in got]))
            print(f"{name:<10} {'on' if reuse else 'off':<6} {100.0 * same / len(keys):>8.0f}% {errors:>6} "
                  f"{forwards:>9.1f} {ms:>9.1f}")
    for reuse in (False, True):
        same = sum(np.array_equal(a.tokens, b.tokens) for a, b in zip(plans["scaffold", reuse], plans["ar", False],
                                                                      strict=True))
        print(f"scaffold == ar with reuse {'on' if reuse else 'off'}: {same}/{len(keys)}")


if __name__ == "__main__":
    main()
