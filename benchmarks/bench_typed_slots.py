"""Typed value slots: parse rate and tokens per forward of the scaffold decoder with and without the
allowed-token masks, on the shipped reference model over held-out generated keyframes (torch, or a bundle on
ONNX Runtime with ``--bundle``), plus ``scaffold == ar`` token for token with the masks on.

    PYTHONPATH=$PWD python benchmarks/bench_typed_slots.py --scenes 10 [--bundle DIR] [--check-ar 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner

MODEL = Path(__file__).resolve().parents[1] / "models" / "reference"


def make_planner(name: str, bundle: Path | None) -> Planner:
    if bundle is None:
        return Planner.from_checkpoint(MODEL, decoder=DecoderSettings(name=name))
    from blockpilot.runtime.bundle_planner import planner_from_bundle

    return planner_from_bundle(bundle, decoder=DecoderSettings(name=name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--check-ar", type=int, default=0, help="compare scaffold with ar on the first N samples")
    args = ap.parse_args()
    frames = heldout_keyframes(args.scenes, stride=args.stride)
    planner = make_planner("scaffold", args.bundle)
    constraints = planner.constraints
    out: dict[str, object] = {"samples": len(frames), "backend": "torch" if args.bundle is None else "onnxruntime",
                              "classes": None if constraints is None else constraints.num_classes}
    for label, active in (("unconstrained", None), ("typed", constraints)):
        planner.constraints = active
        ok, tpf, t0, failures = 0, [], time.perf_counter(), []
        for frame in frames:
            plan = planner.plan(observation(frame))
            ok += plan.ok
            tpf.append(plan.stats.tokens_per_forward)
            if not plan.ok:
                failures.append(str(plan.error))
        out[label] = {"parsed": ok, "parse_rate": round(ok / len(frames), 4),
                      "tokens_per_forward": round(float(np.mean(tpf)), 3),
                      "ms_per_plan": round((time.perf_counter() - t0) * 1e3 / len(frames), 1),
                      "failures": failures[:5]}
        print(label, json.dumps(out[label]))
    if args.check_ar:
        ar = make_planner("ar", args.bundle)
        planner.constraints = constraints
        same = sum(np.array_equal(planner.plan(observation(f)).tokens, ar.plan(observation(f)).tokens)
                   for f in frames[: args.check_ar])
        out["scaffold_equals_ar"] = f"{same}/{min(args.check_ar, len(frames))}"
        print("scaffold == ar", out["scaffold_equals_ar"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
