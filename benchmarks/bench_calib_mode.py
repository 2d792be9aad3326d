"""Teacher-forced against decode-path calibration on the shipped reference model, on one machine.

For each recipe and each of ``--sets`` calibration sets (disjoint generated calibration scenes, so the
spread between sets is the calibration noise), the model is quantized twice, once per ``--calib-mode``,
and replayed over the same held-out scenes (a nuScenes dataroot, scaffold decoder). Prints L2 at 3 s
(UniAD), parse rate, calibration seconds (the forward loop alone) and forwards per mode, with the
mean and spread over the sets.

    .venv/bin/python benchmarks/bench_calib_mode.py [--recipes fp8,nvfp4] [--sets 3] [--calib 16] [--scenes 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockpilot.calibration import CALIBRATION_SEED_BASE, synthetic_calibration_source  # noqa: E402
from blockpilot.eval.nuscenes import NuScenesSource  # noqa: E402
from blockpilot.eval.replay import evaluate_and_report, run_header  # noqa: E402
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE  # noqa: E402
from blockpilot.quant.pipeline import load_planner, quantize_checkpoint  # noqa: E402
from blockpilot.quant.recipes import resolve_recipe  # noqa: E402
from blockpilot.runtime.plan_types import DecoderSettings  # noqa: E402
from blockpilot.sim.generator import generate_scene  # noqa: E402
from blockpilot.sim.writers.nuscenes import write_nuscenes  # noqa: E402
from blockpilot.vla.reference_model import SHIPPED_MODEL  # noqa: E402


def replay(planner: object, dataroot: Path, out: Path, limit: int | None) -> dict[str, float]:
    source = NuScenesSource(dataroot)
    evaluate_and_report(planner, source, out, header=run_header(source, SHIPPED_MODEL, planner), overwrite=True,
                        progress=False, quiet=True, limit=limit)
    m = json.loads((out / "report" / "metrics.json").read_text())
    return {"l2_3s": m["model"]["l2"]["uniad"]["3"], "parse_rate": m["counts"]["parse_rate"],
            "samples": m["model"]["full_future"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="fp8,nvfp4")
    parser.add_argument("--sets", type=int, default=3, help="calibration sets (disjoint scenes) per mode")
    parser.add_argument("--first-set", type=int, default=0,
                        help="index of the first calibration set (sets k use seeds CALIBRATION_SEED_BASE + 1000 k), so "
                             "a later run adds sets to an earlier one's")
    parser.add_argument("--calib", type=int, default=16, help="calibration samples per set")
    parser.add_argument("--calib-scenes", type=int, default=2, help="generated scenes per calibration set")
    parser.add_argument("--scenes", type=int, default=2, help="held-out scenes replayed")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N held-out samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_calib_mode_"))
    dataroot = write_nuscenes([generate_scene(HELDOUT_SEED_BASE + i) for i in range(args.scenes)], work / "heldout")
    fp32 = replay(load_planner(SHIPPED_MODEL, DecoderSettings(name="scaffold")), dataroot, work / "runs" / "fp32",
                  args.limit)
    print(f"fp32: L2@3s {fp32['l2_3s']:.4f} m, parse {fp32['parse_rate']:.1%} on {fp32['samples']} samples",
          file=sys.stderr)
    rows = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        for k in range(args.first_set, args.first_set + args.sets):
            source = synthetic_calibration_source(args.calib_scenes, CALIBRATION_SEED_BASE + 1000 * k)
            for mode in ("decode", "teacher"):
                t0 = time.perf_counter()
                outcome = quantize_checkpoint(SHIPPED_MODEL, resolve_recipe(recipe), source, args.calib,
                                              work / f"{recipe}-{mode}-{k}", cache_dir=work / "calib-cache",
                                              calib_mode=mode)
                loop = outcome.calibration["loop"]
                quantize_s = time.perf_counter() - t0
                r = replay(outcome.planner, dataroot, work / "runs" / f"{recipe}-{mode}-{k}", args.limit)
                rows.append({"recipe": recipe, "set": k, "mode": mode, **r, "calib_seconds": loop["seconds"],
                             "answer_seconds": loop.get("answer_seconds", 0.0), "forwards": loop["forwards"],
                             "answer_sources": loop.get("answer_sources"), "quantize_seconds": quantize_s})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"fp32: L2@3s {fp32['l2_3s']:.4f} m, parse rate {fp32['parse_rate']:.1%}, {fp32['samples']} held-out "
          f"samples ({args.scenes} scenes); {args.calib} calibration samples per set, {args.sets} sets; "
          f"{args.threads} threads")
    print("| recipe | mode | L2@3s per set (m) | mean ± sd (m) | vs fp32 | parse rate | forwards / sample | "
          "calibration s / sample |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for mode in ("decode", "teacher"):
            sel = [r for r in rows if r["recipe"] == recipe and r["mode"] == mode]
            l2 = np.array([r["l2_3s"] for r in sel])
            per = np.mean([(r["calib_seconds"] + r["answer_seconds"]) / args.calib for r in sel])
            print(f"| {recipe} | {mode} | {', '.join(f'{v:.4f}' for v in l2)} | {l2.mean():.4f} ± "
                  f"{l2.std(ddof=1) if len(l2) > 1 else 0.0:.4f} | {l2.mean() / fp32['l2_3s'] - 1:+.2%} | "
                  f"{np.mean([r['parse_rate'] for r in sel]):.1%} | "
                  f"{np.mean([r['forwards'] for r in sel]) / args.calib:.1f} | {per:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"fp32": fp32, "rows": rows, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
