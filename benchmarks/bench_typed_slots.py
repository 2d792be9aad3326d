"""Typed value slots: parse rate and tokens per forward of the scaffold decoder with and without the
allowed-token masks, on the shipped reference model over held-out generated keyframes (torch, or a bundle on
ONNX Runtime with ``--bundle``), plus ``scaffold == ar`` token for token with the masks on.

    PYTHONPATH=$PWD python benchmarks/bench_typed_slots.py --scenes 10 [--bundle DIR | --onnx DIR] [--check-ar 20]
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


def make_planner(name: str, bundle: Path | None, onnx: Path | None = None) -> Planner:
    if onnx is not None:
        from blockpilot.runtime.ort_backend import ort_planner

        return ort_planner(MODEL, onnx, decoder=DecoderSettings(name=name))
    if bundle is None:
        return Planner.from_checkpoint(MODEL, decoder=DecoderSettings(name=name))
    from blockpilot.runtime.bundle_planner import planner_from_bundle

    return planner_from_bundle(bundle, decoder=DecoderSettings(name=name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--onnx", type=Path, help="an export_onnx directory of the reference model (ONNX Runtime)")
    ap.add_argument("--nuscenes", type=Path, help="write the held-out scenes as nuScenes here and replay them "
                    "through the reader (JPEG camera frames), as the demo's eval does")
    ap.add_argument("--check-ar", type=int, default=0, help="compare scaffold with ar on the first N samples")
    args = ap.parse_args()
    observations = []
    if args.nuscenes is not None:
        from blockpilot.eval.nuscenes import NuScenesSource
        from blockpilot.eval.synthetic import HELDOUT_SEED_BASE
        from blockpilot.eval.types import SampleFailure
        from blockpilot.runtime.plan_types import Observation
        from blockpilot.sim.generator import generate_scene
        from blockpilot.sim.writers.nuscenes import write_nuscenes

        if not args.nuscenes.exists():
            write_nuscenes([generate_scene(HELDOUT_SEED_BASE + i) for i in range(args.scenes)], args.nuscenes)
        for sample in NuScenesSource(args.nuscenes):
            if not isinstance(sample, SampleFailure):
                observations.append(Observation(images=sample.load_images(), ego=sample.ego,
                                                route_command=sample.route_command))
    else:
        observations = [observation(f) for f in heldout_keyframes(args.scenes, stride=args.stride)]
    frames = observations
    planner = make_planner("scaffold", args.bundle, args.onnx)
    constraints = planner.constraints
    backend = "torch" if args.bundle is None and args.onnx is None else "onnxruntime"
    out: dict[str, object] = {"samples": len(frames), "backend": backend,
                              "classes": None if constraints is None else constraints.num_classes}
    for label, active in (("unconstrained", None), ("typed", constraints)):
        planner.constraints = active
        ok, tpf, t0, failures = 0, [], time.perf_counter(), []
        for frame in frames:
            plan = planner.plan(frame)
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
        ar = make_planner("ar", args.bundle, args.onnx)
        planner.constraints = constraints
        same = sum(np.array_equal(planner.plan(f).tokens, ar.plan(f).tokens)
                   for f in frames[: args.check_ar])
        out["scaffold_equals_ar"] = f"{same}/{min(args.check_ar, len(frames))}"
        print("scaffold == ar", out["scaffold_equals_ar"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
