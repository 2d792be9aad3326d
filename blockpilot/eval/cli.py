"""``blockpilot eval``: replay a recorded dataset through the planner and write the report;
``blockpilot eval compare A B``: two runs side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.backend import BACKENDS
from ..runtime.plan_types import DECODERS
from .types import DatasetError, Source

if TYPE_CHECKING:
    from ..runtime.sources import RestoreQuantized

SOURCES = ("nuscenes", "wod", "mcap")


class EvalUsageError(ValueError):
    """A bad ``blockpilot eval`` invocation (missing option, unknown source)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, help="dataset format of --dataroot")
    parser.add_argument("--dataroot", help="nuScenes dataroot, WOD-E2E TFRecord file or folder, rosbag2 folder")
    parser.add_argument("--checkpoint", help="model checkpoint dir (config.json, safetensors, tokenizer.json), or what "
                                             "blockpilot quantize wrote (its --out dir)")
    parser.add_argument("--bundle", help="exported bundle dir (verified; ONNX Runtime, or --backend tensorrt) instead "
                                         "of --checkpoint")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="auto: torch for --checkpoint, onnxruntime for --bundle; tensorrt runs a bundle's "
                             "engines, cuda a checkpoint on the GPU fast path")
    parser.add_argument("--decoder", default="scaffold", choices=DECODERS, help="decoder (default: scaffold)")
    parser.add_argument("--threshold", type=float, default=None, help="decoder confidence threshold")
    parser.add_argument("--rollouts", type=positive_int, default=4, help="trajectories for --decoder rollouts")
    parser.add_argument("--out", default="runs/eval", help="run directory: results.jsonl and report/")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming results.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    from ..vla.dtypes import add_dtype_option

    add_dtype_option(parser)  # with --checkpoint; a bundle runs in the dtype it was exported in
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt budget of the KV cache (default: the checkpoint's image policy times the "
                             "cameras; with --bundle at most what its export holds)")
    from ..vla.schema_io import add_schema_option

    add_schema_option(parser)
    nus = parser.add_argument_group("nuScenes")
    nus.add_argument("--version", default="auto", help="table folder, e.g. v1.0-trainval (default: the only one)")
    nus.add_argument("--frame", default="ego", choices=["ego", "lidar"],
                     help="ground-truth frame: ego (x forward, y left) or LIDAR_TOP as ST-P3/UniAD/VAD")
    nus.add_argument("--scenes", default=None, help="comma-separated scene names (default: all)")
    nus.add_argument("--stride", type=positive_int, default=1, help="every n-th keyframe")
    parser.add_argument("--cameras", default=None,
                        help="comma-separated cameras in prompt order (default: CAM_FRONT / FRONT), or 'all': "
                             "nuScenes' 6 or WOD-E2E's 8 in the documented order")
    bag = parser.add_argument_group("rosbag2 (MCAP)")
    bag.add_argument("--image-topic", default="/camera/front/image_raw/compressed")
    bag.add_argument("--odom-topic", default="/odom")
    bag.add_argument("--route-topic", default="/route_command")
    sub = parser.add_subparsers(dest="eval_command", metavar="{compare}")
    compare = sub.add_parser("compare", help="compare two runs (e.g. fp32 vs fp8) with deltas")
    compare.add_argument("run_a", help="run directory or results.jsonl (baseline)")
    compare.add_argument("run_b", help="run directory or results.jsonl (candidate)")
    compare.add_argument("--out", dest="compare_out", default=None, help="write compare.md / compare.json here")


def build_source(args: argparse.Namespace) -> Source:
    if not args.source or not args.dataroot:
        raise EvalUsageError("--source and --dataroot are required")
    return open_source(args.source, args.dataroot, cameras=parse_cameras(args.source, args.cameras),
                       version=args.version, frame=args.frame,
                       scenes=[s.strip() for s in args.scenes.split(",")] if args.scenes else None,
                       stride=args.stride, image_topic=args.image_topic, odom_topic=args.odom_topic,
                       route_topic=args.route_topic)


def parse_cameras(kind: str, text: str | None) -> tuple[str, ...] | None:
    """``--cameras``: ``None`` (the source's default), ``all`` (the rig's cameras in prompt order) or a list."""
    if not text:
        return None
    if text.strip().lower() == "all":
        from .camera_rigs import rig_cameras

        return rig_cameras(kind)
    return tuple(c.strip() for c in text.split(","))


def open_source(kind: str, dataroot: str | Path, *, cameras: tuple[str, ...] | None = None, version: str = "auto",
                frame: str = "ego", scenes: list[str] | None = None, stride: int = 1,
                image_topic: str = "/camera/front/image_raw/compressed", odom_topic: str = "/odom",
                route_topic: str = "/route_command") -> Source:
    """A replay source of ``kind`` (nuscenes, wod, mcap) over a local dataset copy."""
    if kind == "nuscenes":
        from .nuscenes import NuScenesSource

        return NuScenesSource(dataroot, version, frame=frame, cameras=cameras or ("CAM_FRONT",), scenes=scenes,
                              keyframe_stride=stride)
    if kind == "wod":
        from .wod import WodE2ESource

        return WodE2ESource(dataroot, cameras=cameras or ("FRONT",))
    if kind == "mcap":
        from .mcap import Rosbag2Source

        return Rosbag2Source(dataroot, image_topic=image_topic, odom_topic=odom_topic, route_topic=route_topic)
    raise EvalUsageError(f"unknown source {kind!r}; expected one of {SOURCES}")


def run_header(source: Source, checkpoint: Path, planner: Any) -> dict[str, Any]:
    """The settings a results file is tied to (a resume must match them)."""
    import blockpilot

    return {
        "source": {"name": source.name, **source.describe()},
        "checkpoint": str(checkpoint.resolve()),
        "decoder": planner.settings.to_dict(),
        "schema": {"num_waypoints": int(planner.schema.num_waypoints), "rate_hz": float(planner.schema.rate_hz)},
        "blockpilot": getattr(blockpilot, "__version__", "dev"),
    }


def driving_schema(checkpoint: Path, spec: str | None) -> Any:
    """The shared ``--schema`` option resolved for a driving planner (None: the checkpoint's own)."""
    if spec is None:
        return None
    from ..vla.plans import DrivingSchema
    from ..vla.schema_io import resolve_schema

    schema = resolve_schema(checkpoint, spec)
    if not isinstance(schema, DrivingSchema):
        raise EvalUsageError(f"--schema {spec}: replays plan driving and need a driving schema, got "
                             f"{type(schema).__name__}")
    return schema


def run(args: argparse.Namespace, *, restore_quantized: RestoreQuantized | None = None) -> int:
    """``blockpilot eval`` (``restore_quantized``: how a quantize output given as ``--checkpoint`` is restored)."""
    if args.eval_command == "compare":
        from .compare import compare_runs, format_comparison

        result = compare_runs(args.run_a, args.run_b, out_dir=args.compare_out)
        print(format_comparison(result))
        return 0
    if bool(args.checkpoint) == bool(args.bundle):
        raise EvalUsageError("pass exactly one of --checkpoint (torch) and --bundle (ONNX Runtime)")
    if args.bundle and getattr(args, "schema", None):
        raise EvalUsageError("--schema applies to --checkpoint; a bundle decodes with the schema it was exported with")
    if args.bundle and args.dtype != "auto":
        raise EvalUsageError(f"--dtype {args.dtype} applies to --checkpoint; a bundle runs in the dtype it was "
                             "exported in")
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import detect_source, open_planner

    source = build_source(args)
    flag = "--bundle" if args.bundle else "--checkpoint"
    found = detect_source(args.bundle or args.checkpoint, flag=flag,
                          kinds=("bundle",) if args.bundle else ("checkpoint", "quantized"))
    settings = DecoderSettings(name=args.decoder, threshold=args.threshold, rollouts=args.rollouts)
    if args.threads and not args.bundle:
        import torch

        torch.set_num_threads(args.threads)
    model_path = found.path
    schema = None if args.bundle else driving_schema(found.checkpoint or model_path, getattr(args, "schema", None))
    backend = getattr(args, "backend", "auto")
    planner = open_planner(found, backend=backend, decoder=settings, device=args.device,
                           dtype=args.dtype, max_prompt_tokens=args.max_prompt_tokens, schema=schema,
                           cameras=len(getattr(source, "cameras", ("one",))), threads=args.threads or 1,
                           restore_quantized=restore_quantized, flag=flag)
    header = run_header(source, model_path, planner)
    header["backend"] = found.default_backend if backend == "auto" else backend
    if not args.bundle:
        header["dtype"] = getattr(planner.backend, "dtype", None)  # what auto resolved to; a resume must match it
    if found.kind == "quantized":
        header["quantized"] = str(found.quantized.resolve()) if found.quantized else None
    return evaluate_and_report(planner, source, Path(args.out), header=header, limit=args.limit,
                               overwrite=args.overwrite, progress=not args.no_progress)


def evaluate_and_report(planner: Any, source: Source, out: Path, *, header: dict[str, Any], limit: int | None = None,
                        overwrite: bool = False, progress: bool = True, quiet: bool = False) -> int:
    from .evaluator import REPORT_DIR, run_evaluation
    from .report import write_report
    from .summary import skipped_line

    summary = run_evaluation(planner, source, out, header=header, limit=limit, overwrite=overwrite,
                             progress=progress)
    report = write_report(summary.results, out / REPORT_DIR)
    metrics = json.loads((report / "metrics.json").read_text())
    counts = metrics["counts"]
    why_skipped = skipped_line(counts)
    if not quiet:
        print(headline(metrics))
        print(f"{summary.written} samples evaluated, {summary.resumed} resumed; counts {summary.counts}")
        if why_skipped:
            print(why_skipped)
        print(f"results: {summary.results}\nreport:  {report / 'summary.md'} (and summary.html, plots/)")
    if counts["failed"]:
        first = next(f for f in counts["failures"] if f["status"] == "failed")
        print(f"blockpilot eval: {counts['failed']} of {counts['total']} samples failed; first: "
              f"{first['sample_id']}: {first['error']}", file=sys.stderr)
    if counts["total"] and not counts["ok"] + counts["parse_error"]:
        print(f"blockpilot eval: error: no sample of {counts['total']} could be planned on "
              f"({counts['failed']} failed, {counts['skipped']} skipped); the report lists why"
              f"{'; ' + why_skipped if why_skipped else ''}", file=sys.stderr)
        return 1
    return 0


def headline(metrics: dict[str, Any]) -> str:
    """Two lines for a terminal: L2 both conventions, collisions and parse rate, model vs CV."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = []
    for who in ("model", "cv"):
        m = metrics.get(who) or {}
        l2 = m.get("l2", {})
        avg = l2.get("stp3_vad", {}) or {}
        at = l2.get("uniad", {}) or {}
        coll = (m.get("collision", {}) or {}).get("stp3_vad", {}) or {}
        lines.append(f"{who:5s} L2 avg-up-to-t 1/2/3 s {fmt(avg.get('1'))}/{fmt(avg.get('2'))}/{fmt(avg.get('3'))} m"
                     f"  at-t {fmt(at.get('1'))}/{fmt(at.get('2'))}/{fmt(at.get('3'))} m"
                     f"  collision(ST-P3) 3 s {fmt(coll.get('3'))} %")
    counts, latency = metrics.get("counts") or {}, metrics.get("latency") or {}
    if counts.get("parse_rate") is not None:
        planned = counts.get("ok", 0) + counts.get("parse_error", 0)
        lines.append(f"plans parsed {100 * counts['parse_rate']:.2f} % ({counts.get('ok', 0)}/{planned}), "
                     f"{fmt(latency.get('forwards_per_plan'))} forwards per plan, "
                     f"{fmt(latency.get('tokens_per_forward'))} answer tokens per decode forward")
    return "\n".join(lines)


def report_error(exc: Exception) -> int:
    print(f"blockpilot eval: error: {exc}", file=sys.stderr)
    return 2


USER_ERRORS: tuple[type[Exception], ...] = (EvalUsageError, DatasetError)
