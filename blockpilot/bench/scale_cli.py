"""The ``blockpilot bench scale`` arguments, its table and its files
(``benchmarks/results/scale_<shape>_<date>.{json,txt}``, rewritten after every stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic_io import atomic_write
from ..vla.dtypes import DTYPE_CHOICES
from .scale import ScaleBenchError, ScaleOptions, ScaleReport, run_scale
from .scale_shapes import SCALE_SHAPES

STAGE_NAMES = ("load", "plan-torch", "quantize-fp8", "quantize-nvfp4", "export", "rtx-fp16", "rtx-fp8", "inspect",
               "verify", "plan-ort", "eval", "ros-configure")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", required=True, choices=list(SCALE_SHAPES),
                        help="tiny (CI, ~42 M parameters), 0.5b, 1.5b (Fast_dLLM_v2_1.5B), 3b (Qwen2.5-VL-3B "
                             "Fast-dVLM / Fast-dDrive), 7b (Fast_dLLM_v2_7B); random bf16 weights")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of: {', '.join(STAGE_NAMES)} (default: all; the checkpoint "
                             "is always written first)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds each stage may run (default 3600)")
    parser.add_argument("--plan-steps", type=int, default=8, help="block steps each plan stage times (default 8)")
    parser.add_argument("--calib", type=int, default=4, help="calibration samples of the quantize stages")
    parser.add_argument("--force-external-data", action="store_true",
                        help="export every graph with external data (BLOCKPILOT_EXTERNAL_DATA_BYTES=4096), as a model "
                             "over 2 GB needs")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="dtype of the load and plan-torch stages: auto (the checkpoint's, bfloat16), float32, "
                             "bfloat16, float16 (default: auto)")
    parser.add_argument("--work", default=None, help="scratch directory (default runs/scale/<shape>; replaced)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles in --work")
    parser.add_argument("--results", default="benchmarks/results", help="directory of the JSON and table")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def format_scale(report: ScaleReport) -> str:
    m, v = report.machine, report.versions
    ram = f"{m['ram_bytes'] / 2**30:.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    out = [f"blockpilot bench scale --shape {report.shape} ({report.published_as}), {report.date}",
           f"machine: {m['cpu']}, {m['cpu_count']} CPUs, {ram}, device {m['device']}",
           "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"parameters {report.parameters or '-'}, bf16 weight bytes {report.weight_bytes or '-'} "
           f"({_gib(report.weight_bytes)} GiB); peak RSS x = peak RSS / bf16 weight bytes", ""]
    headers = ["stage", "what", "status", "rc", "wall s", "peak RSS GiB", "x weights", "notes"]
    rows = []
    for s in report.stages:
        note = ""
        d = s.details
        if "s_per_step" in d and d["s_per_step"] is not None:
            note = f"{d['steps']} steps, {d['s_per_step']:.2f} s/step, prefill {d['prefill_s']:.2f} s"
            note += f", {d['dtype']}" if d.get("dtype") else ""
        elif "load_s" in d:
            note = f"load {d['load_s']:.1f} s, {'/'.join(d['dtypes'])}"
        elif "configure_s" in d:
            note = f"configure {d['configure_s']:.1f} s"
        if s.status != "passed" and s.error:
            note = (s.error.strip().splitlines() or [""])[-1][:110]
        rows.append([s.name, s.what, s.status, "-" if s.rc is None else str(s.rc),
                     "-" if s.wall_s is None else f"{s.wall_s:.1f}", _gib(s.peak_rss_bytes),
                     "-" if s.rss_x_weights is None else f"{s.rss_x_weights:.2f}", note])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_scale(report: ScaleReport, results: Path) -> tuple[Path, Path]:
    results.mkdir(parents=True, exist_ok=True)
    stem = f"scale_{report.shape}_{report.date}"  # not with_suffix: "0.5b" holds a dot
    js, txt = results / f"{stem}.json", results / f"{stem}.txt"
    atomic_write(js, json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write(txt, format_scale(report))
    return js, txt


def run(args: argparse.Namespace) -> int:
    stages = None
    if args.stages:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        bad = [s for s in stages if s not in STAGE_NAMES]
        if bad:
            raise ScaleBenchError(f"--stages: {', '.join(bad)} not in {', '.join(STAGE_NAMES)}")
    if args.plan_steps < 0 or args.calib < 1 or args.timeout <= 0:
        raise ScaleBenchError("--plan-steps must be >= 0, --calib >= 1 and --timeout > 0")
    results = Path(args.results)
    opts = ScaleOptions(shape=args.shape, work=Path(args.work or f"runs/scale/{args.shape}"), results=results,
                        timeout_s=args.timeout, stages=stages, plan_steps=args.plan_steps, calib=args.calib,
                        force_external_data=args.force_external_data, keep=args.keep, dtype=args.dtype)
    def progress(partial: ScaleReport) -> None:
        write_scale(partial, results)

    report = run_scale(opts, log=lambda line: print(line, flush=True), progress=progress)
    js, txt = write_scale(report, results)
    print()
    print(format_scale(report), end="")
    print(f"report: {js} and {txt}")
    return 0 if all(s.status in ("passed", "skipped") for s in report.stages) else 1
