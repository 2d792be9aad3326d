"""The ``blockpilot bench`` arguments, its table and its JSON file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic_io import atomic_write
from ..cli_common import UserError, add_json_option, add_trusted_key_option, existing_dir, positive_int, writable_target
from ..errors import require_extra
from .shapes import DTYPE_NAMES, MODELS

if TYPE_CHECKING:  # the bench itself needs torch: imported when it runs
    from .run import BenchOptions, Report


def _names(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{what}: {bad or value!r} not in {', '.join(allowed)}")
    return names


def _threads(value: str) -> str:
    counts = [t.strip() for t in value.split(",") if t.strip()]
    if not counts or not all(t.isdigit() and int(t) >= 1 for t in counts):
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts >= 1, got {value!r}")
    return value


def _decoders(value: str) -> str:
    from ..runtime.plan_types import DECODERS

    bad = [d.strip() for d in value.split(",") if d.strip() and d.strip() not in DECODERS]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {', '.join(DECODERS)}")
    return value


def _image(value: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image: expected HEIGHTxWIDTH pixels, got {value!r}") from None
    if height < 28 or width < 28:
        raise argparse.ArgumentTypeError(f"--image: {value!r} is smaller than one merged patch (28x28)")
    return height, width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, type=lambda v: _names(v, MODELS, "--models"),
                        help="comma-separated: reference (the shipped checkpoint), 1.5b (Fast_dLLM_v2_1.5B shape), "
                             "3b (Fast-dDrive / Qwen2.5-VL-3B LM shape); the last two have random weights")
    parser.add_argument("--dtypes", default=None, type=lambda v: _names(v, DTYPE_NAMES, "--dtypes"),
                        help="comma-separated: fp32, bf16, fp16, fp8 (default: bf16,fp8 on a GPU, fp32,bf16 on a CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    parser.add_argument("--allow-slow", action="store_true", help="also run the 1.5B / 3B shapes on a CPU")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="timed forwards per measurement (the p50 is kept)")
    parser.add_argument("--plan-repeats", type=positive_int, default=5, help="timed plans per decoder and backend")
    parser.add_argument("--threads", default="1,2", type=_threads, help="CPU thread counts to run at (comma-separated)")
    parser.add_argument("--kv-tokens", type=positive_int, default=1024, help="KV cache slots a block step attends to")
    parser.add_argument("--block-tokens", type=positive_int, default=32, help="tokens of one block step")
    parser.add_argument("--decoders", default="ar,block,scaffold", type=_decoders,
                        help="decoders to plan with on the reference model (empty: no plans)")
    parser.add_argument("--no-transformers", dest="hf", action="store_false",
                        help="skip transformers generate")
    parser.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                        help="skip the ONNX Runtime plans on a CPU")
    parser.add_argument("--checkpoint", default=None,
                        help="the reference checkpoint (default: models/reference); a robot model (action-chunk "
                             "schema, e.g. models/robot-so101) plans its robot prompt")
    parser.add_argument("--cameras", type=positive_int, default=None,
                        help="camera frames in a robot checkpoint's plan prompt (default 1; 2: third-person and wrist)")
    parser.add_argument("--bundle", default=None,
                        help="an exported bundle (driving or robot): time its plans on ONNX Runtime, per --threads "
                             "and --decoders, instead of the models' steps and plans")
    add_trusted_key_option(parser)  # with --bundle
    parser.add_argument("--fp8-per-channel", action="store_true",
                        help="fp8 weights with per-output-channel scales (row-wise scaled_mm) instead of per tensor")
    parser.add_argument("--image", default="504x896", type=_image,
                        help="HEIGHTxWIDTH of the camera image the 3b plan estimate's vision tower encodes")
    parser.add_argument("--out", default="runs/bench/bench.json", help="JSON report path")
    add_json_option(parser)
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    scale = sub.add_parser("scale", help="every stage (load, plan, quantize, export, engines, bundle, eval, ROS) on a "
                                         "random-weight checkpoint of a published shape: wall time and peak RSS")
    from .scale_cli import add_arguments as add_scale_arguments

    add_scale_arguments(scale)


def options_from(args: argparse.Namespace) -> BenchOptions:
    from .run import BenchOptions

    threads = tuple(int(t) for t in str(args.threads).split(",") if t.strip())
    decoders = tuple(d.strip() for d in str(args.decoders).split(",") if d.strip())
    extra: dict[str, Any] = {"checkpoint": Path(args.checkpoint)} if args.checkpoint else {}
    if args.bundle:
        extra.update(bundle=Path(args.bundle), trusted_keys=tuple(str(k) for k in args.trusted_keys))
    return BenchOptions(models=() if args.bundle else (args.models or MODELS), dtypes=args.dtypes,
                        device="cpu" if args.bundle else args.device, allow_slow=args.allow_slow,
                        repeats=args.repeats, plan_repeats=args.plan_repeats, threads=threads or (1,),
                        kv_tokens=args.kv_tokens, block_tokens=args.block_tokens, decoders=decoders, hf=args.hf,
                        onnxruntime=args.onnxruntime, image=args.image,
                        fp8_per_channel=args.fp8_per_channel, cameras=args.cameras, **extra)


def _cell(value: Any, fmt: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, fmt) if isinstance(value, float) else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def _observation_line(described: dict[str, Any] | None) -> str:
    """What the plans were made on (:func:`~.observations.bench_observation`'s description)."""
    if not described or described["kind"] == "driving":
        return "a driving keyframe, 1 camera"
    return (f"a robot prompt: {described['cameras']} camera(s), {len(described['state_dims'])} state dims, answer "
            f"{described['steps']} x {', '.join(described['dims'])} ({described['action']})")


def format_report(report: Report) -> str:
    d, bw, s = report.device, report.bandwidth, report.settings
    out = [f"blockpilot bench on {d['name']} ({d['type']}, torch {d['torch']}); memory bandwidth "
           f"{bw['gb_per_s']:.1f} GB/s ({bw['method']}, {bw['bytes'] >> 20} MiB)", ""]
    if report.steps:
        out.append(f"Block step: {s['block_tokens']} tokens over a {s['kv_tokens']}-token KV cache (bidirectional "
                   "draft); AR step: 1 token, causal. Roofline = (weights + KV read) / bandwidth; ratio = measured / "
                   f"roofline. fp8: e4m3 weights with per-{'channel' if s.get('fp8_per_channel') else 'tensor'} "
                   "scales, dynamic per-tensor activation scales, bf16 activations.")
        rows = [[r["model"], r["dtype"], r["backend"], _cell(r["threads"]), _cell(r["step_ms"], ".3f"),
                 _cell(r["roofline_ms"], ".3f"), _cell(r["ratio"]), _cell(r["bytes"] / 1e6, ".1f"),
                 _cell(r["ar_ms"], ".3f"), _cell(r["ar_roofline_ms"], ".3f"), _cell(r["ar_ratio"])]
                for r in report.steps]
        out += [_table(["model", "dtype", "backend", "threads", "step ms", "roofline ms", "ratio", "MB read",
                        "AR ms", "AR roofline ms", "AR ratio"], rows), ""]
    if report.ar:
        out.append(f"AR decode, ms per token (greedy, batch 1, {s['kv_tokens']}-token prompt); transformers "
                   "generate on a Qwen2ForCausalLM of the same shape")
        rows = [[r["model"], r["dtype"], r["impl"], _cell(r["threads"]), _cell(r["ms_per_token"], ".3f"),
                 _cell(r["speedup_vs_transformers"])] for r in report.ar]
        out += [_table(["model", "dtype", "implementation", "threads", "ms/token", "x transformers"], rows), ""]
    if report.plans:
        target = s["cpu_target_ms"]
        planned = f"the bundle {s['bundle']} on ONNX Runtime" if s.get("bundle") else "the reference model"
        out.append(f"Plans on {planned} through the Planner (p50 of {s['plan_repeats']}, prompt "
                   f"{report.plans[0]['prompt_tokens']} tokens, {_observation_line(s.get('plan_observation'))})" +
                   (f"; the CPU target is p50 < {target:.0f} ms (the scaffold decoder is the default)"
                    if d["type"] == "cpu" else ""))
        rows = [[r["dtype"], r["backend"], _cell(r["threads"]), r["decoder"], _cell(r["p50_ms"], ".1f"),
                 str(r["forwards"]), _cell(r["tokens_per_forward"]), _cell(r["parsed"]),
                 _cell(r.get("cpu_target_met"))] for r in report.plans]
        out += [_table(["dtype", "backend", "threads", "decoder", "ms/plan", "forwards", "tokens/forward", "parsed",
                        f"< {target:.0f} ms"], rows), ""]
    if report.estimates:
        out.append("Plan estimates for the large shapes: vision tower on one image + prefill + block steps, with "
                   "the forwards of the reference model's plan with the same decoder, backend and dtype")
        rows = [[r["model"], r["dtype"], r["backend"], r["decoder"], str(r["forwards"]), _cell(r["tokens_per_forward"]),
                 f"{r['image'] or '-'} ({r['image_tokens'] or 0})", _cell(r["vision_ms"], ".1f"),
                 _cell(r["prefill_ms"], ".1f"), _cell(r["step_ms"], ".3f"), _cell(r["plan_ms"], ".1f"),
                 _cell(r.get("tokens_per_s"), ".0f"), _cell(r.get("x_transformers"), ".1f")]
                for r in report.estimates]
        out += [_table(["model", "dtype", "backend", "decoder", "forwards", "tokens/forward", "image (tokens)",
                        "vision ms", f"prefill {s['kv_tokens']} ms", "step ms", "plan ms", "tokens/s",
                        "x transformers"], rows),
                "(tokens/s: the plan's answer tokens over its estimated time, vision and prefill included; x "
                "transformers: that over transformers generate's tokens/s on the same shape in bf16)", ""]
    out += [f"skipped: {reason}" for reason in report.skipped]
    out += [f"FAILED: {error}" for error in report.failed]
    return "\n".join(out).rstrip() + "\n"


def write_report(report: Report, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(report.to_dict(), indent=2) + "\n")
    return out


def check_bundle_arguments(args: argparse.Namespace) -> None:
    """``--bundle`` times plans only, on ONNX Runtime on the CPU: the model flags are refused, naming them."""
    existing_dir("--bundle", args.bundle, holding="manifest.json")
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--models", args.models),
                                      ("--dtypes", args.dtypes), ("--allow-slow", args.allow_slow)) if value]
    if given:
        raise UserError(f"{', '.join(given)}: a bundle's plans are timed as it was exported; --bundle goes without "
                        "the model flags (bench --checkpoint times a checkpoint's steps and plans)")
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: --bundle plans on ONNX Runtime on the CPU; time a bundle's "
                        "TensorRT engines with blockpilot jetson bench or eval --bundle --backend tensorrt")
    if not args.decoders.strip():
        raise UserError("--decoders: --bundle times plans, give at least one decoder")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "scale":
        from .scale_cli import run as run_scale_command

        return run_scale_command(args)
    if args.checkpoint:
        existing_dir("--checkpoint", args.checkpoint, holding="config.json")
    if args.bundle:
        check_bundle_arguments(args)
    elif args.trusted_keys:
        raise UserError("--trusted-key applies to --bundle")
    writable_target("--out", args.out)
    require_extra("torch", "torch", "bench")
    opts = options_from(args)
    from .run import run_bench

    log = sys.stderr if args.json else sys.stdout  # --json: stdout holds the report's JSON alone
    report = run_bench(opts, log=lambda line: print(line, file=log, flush=True),
                       progress=lambda partial: write_report(partial, args.out))
    path = write_report(report, args.out)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print()
        print(format_report(report), end="")
        print(f"report: {path}")
    return 1 if report.failed else 0
