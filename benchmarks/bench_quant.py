"""Quality of the reference model per precision, measured in one run on one machine.

For fp32 and each recipe (fake quantization on CPU; NVFP4 through the CPU emulation of modelopt's
op) the shipped model is calibrated on generated calibration scenes, replayed over held-out scenes
written as a nuScenes dataroot (the scaffold decoder), and checked for scaffold == AR on a subset.

    .venv/bin/python benchmarks/bench_quant.py [--recipes fp8,nvfp4,mixed,auto] [--scenes 4] [--calib 32]

Prints L2 at 3 s (UniAD and ST-P3/VAD conventions), the change against fp32, parse rate, tokens per
forward and the scaffold/AR agreement. CPU latency of fake-quantized models is not deployment latency.
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

from blockpilot.calibration import synthetic_calibration_source  # noqa: E402
from blockpilot.eval.nuscenes import NuScenesSource  # noqa: E402
from blockpilot.eval.replay import evaluate_and_report, run_header  # noqa: E402
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE, heldout_keyframes, observation  # noqa: E402
from blockpilot.quant.pipeline import load_planner, quantize_checkpoint  # noqa: E402
from blockpilot.quant.recipes import resolve_recipe  # noqa: E402
from blockpilot.runtime.plan_types import DecoderSettings  # noqa: E402
from blockpilot.runtime.planner import Planner  # noqa: E402
from blockpilot.sim.generator import generate_scene  # noqa: E402
from blockpilot.sim.writers.nuscenes import write_nuscenes  # noqa: E402
from blockpilot.vla.reference_model import SHIPPED_MODEL  # noqa: E402


def agreement(planner: Planner, observations: list) -> tuple[int, float]:
    ar = Planner.from_model(planner.backend.model, planner.tokenizer,  # type: ignore[attr-defined]
                            decoder=DecoderSettings(name="ar"), schema=planner.schema)
    same, tokens = 0, []
    for obs in observations:
        a, b = planner.plan(obs).tokens, ar.plan(obs).tokens
        same += int(np.array_equal(a, b))
        tokens.append(float((a == b).mean()) if a.shape == b.shape else 0.0)
    return same, float(np.mean(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="fp8,nvfp4,mixed,auto")
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes replayed")
    parser.add_argument("--calib", type=int, default=32, help="calibration samples")
    parser.add_argument("--agreement-samples", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    dataroot = write_nuscenes([generate_scene(HELDOUT_SEED_BASE + i) for i in range(args.scenes)], work / "heldout")
    calib_source = synthetic_calibration_source(4)
    subset = [observation(k) for k in heldout_keyframes(args.scenes, stride=8)[: args.agreement_samples]]
    rows = []
    for name in ["fp32", *[r for r in args.recipes.split(",") if r]]:
        t0 = time.perf_counter()
        if name == "fp32":
            planner, emulated, bits = load_planner(SHIPPED_MODEL, DecoderSettings(name="scaffold")), False, 32.0
        else:
            outcome = quantize_checkpoint(SHIPPED_MODEL, resolve_recipe(name), calib_source, args.calib, work / name,
                                          cache_dir=work / "calib-cache")
            planner, emulated = outcome.planner, outcome.report.emulated
            bits = outcome.auto["effective_bits"] if outcome.auto else float("nan")
        source = NuScenesSource(dataroot)
        evaluate_and_report(planner, source, work / "runs" / name, header=run_header(source, SHIPPED_MODEL, planner),
                            overwrite=True, progress=False, quiet=True)
        m = json.loads((work / "runs" / name / "report" / "metrics.json").read_text())
        same, tok = agreement(planner, subset)
        rows.append({"precision": name, "emulated": emulated, "auto_bits": bits,
                     "l2_3s_uniad": m["model"]["l2"]["uniad"]["3"], "l2_avg_stp3": m["model"]["l2"]["stp3_vad"]["avg"],
                     "collision_3s": m["model"]["collision"]["stp3_vad"]["3"],
                     "parse_rate": m["counts"]["parse_rate"], "tokens_per_forward": m["latency"]["tokens_per_forward"],
                     "samples": m["model"]["full_future"], "ss_eq_ar": f"{same}/{len(subset)}", "ss_ar_tokens": tok,
                     "seconds": time.perf_counter() - t0})
        print(f"done {name} in {rows[-1]['seconds']:.0f} s", file=sys.stderr)
    base = rows[0]["l2_3s_uniad"]
    print("| precision | L2@3s UniAD (m) | vs fp32 | L2 avg ST-P3 (m) | coll. 3 s (%) | parse | tokens/fwd | "
          "SS == AR (plans) | SS/AR token agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["precision"] + (" (NVFP4 emulated)" if r["emulated"] else "")
        if r["precision"] == "auto":
            label += f" ({r['auto_bits']:.2f} bits)"
        print(f"| {label} | {r['l2_3s_uniad']:.3f} | {(r['l2_3s_uniad'] / base - 1):+.1%} | {r['l2_avg_stp3']:.3f} | "
              f"{r['collision_3s']:.2f} | {r['parse_rate']:.1%} | {r['tokens_per_forward']:.2f} | {r['ss_eq_ar']} | "
              f"{r['ss_ar_tokens']:.2%} |")
    print(f"({rows[0]['samples']} full-future held-out samples, {args.scenes} scenes; "
          f"calibration {args.calib} samples)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
