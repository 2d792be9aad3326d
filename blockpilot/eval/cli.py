"""``blockpilot eval``: replay a recorded dataset through the planner and write the report;
``blockpilot eval compare A B``: two runs side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli_common import (
    UserError,
    add_json_option,
    add_trusted_key_option,
    emit,
    existing_dir,
    existing_path,
    fraction,
    positive_int,
)
from ..runtime.backend import BACKENDS
from ..runtime.plan_types import DECODERS
from .replay import (
    SOURCES,
    EvalUsageError,
    driving_schema,
    evaluate_and_report,
    open_source,
    parse_cameras,
    run_header,
)
from .robot_eval import ROBOT_SOURCES
from .types import Source

if TYPE_CHECKING:
    from ..runtime.sources import RestoreQuantized


__all__ = ["positive_int"]  # re-exported for the command modules that took it from here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=(*SOURCES, *ROBOT_SOURCES), help="dataset format of --dataroot")
    parser.add_argument("--dataroot", help="nuScenes dataroot, WOD-E2E TFRecord file or folder, rosbag2 folder, "
                                          "LeRobot dataset folder")
    parser.add_argument("--checkpoint", help="model checkpoint dir (config.json, safetensors, tokenizer.json), or what "
                                             "blockpilot quantize wrote (its --out dir)")
    parser.add_argument("--bundle", help="exported bundle dir (verified; ONNX Runtime, or --backend tensorrt) instead "
                                         "of --checkpoint")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="auto: torch for --checkpoint, onnxruntime for --bundle; tensorrt runs a bundle's "
                             "engines, cuda a checkpoint on the GPU fast path")
    parser.add_argument("--decoder", default="scaffold", choices=DECODERS, help="decoder (default: scaffold)")
    parser.add_argument("--threshold", type=fraction, default=None, help="decoder confidence threshold (0 to 1)")
    parser.add_argument("--rollouts", type=positive_int, default=4, help="trajectories for --decoder rollouts")
    parser.add_argument("--out", default="runs/eval", help="run directory: results.jsonl and report/")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming results.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's, one per core; where other work shares the cores, "
                             "1: a small model planned on oversubscribed cores runs many times slower)")
    from ..vla.dtypes import add_dtype_option

    add_dtype_option(parser)  # with --checkpoint; a bundle runs in the dtype it was exported in
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="prompt budget of the KV cache (default: the checkpoint's image policy times the "
                             "cameras; with --bundle at most what its export holds)")
    from ..vla.schema_io import add_schema_option

    add_schema_option(parser)
    add_json_option(parser)
    add_trusted_key_option(parser)  # with --bundle
    nus = parser.add_argument_group("nuScenes")
    nus.add_argument("--version", default="auto", help="table folder, e.g. v1.0-trainval (default: the only one)")
    nus.add_argument("--frame", default="ego", choices=["ego", "lidar"],
                     help="ground-truth frame: ego (x forward, y left) or LIDAR_TOP as ST-P3/UniAD/VAD")
    nus.add_argument("--scenes", default=None, help="comma-separated scene names (default: all)")
    nus.add_argument("--stride", type=positive_int, default=1, help="every n-th keyframe")
    parser.add_argument("--cameras", default=None,
                        help="comma-separated cameras in prompt order (default: CAM_FRONT / FRONT), or 'all': "
                             "nuScenes' 6 or WOD-E2E's 8 in the documented order; with --closed-loop: front, "
                             "wrist (default front)")
    from .robot_closed_loop_cli import add_closed_loop_arguments

    add_closed_loop_arguments(parser)
    from .ray_cli import add_ray_arguments

    add_ray_arguments(parser)
    bag = parser.add_argument_group("rosbag2 (MCAP)")
    bag.add_argument("--image-topic", default="/camera/front/image_raw/compressed")
    bag.add_argument("--odom-topic", default="/odom")
    bag.add_argument("--route-topic", default="/route_command")
    sub = parser.add_subparsers(dest="eval_command", metavar="{compare}")
    compare = sub.add_parser("compare", help="compare two runs (e.g. fp32 vs fp8) with deltas")
    compare.add_argument("run_a", help="run directory or results.jsonl (baseline)")
    compare.add_argument("run_b", help="run directory or results.jsonl (candidate)")
    compare.add_argument("--out", dest="compare_out", default=None, help="write compare.md / compare.json here")
    add_json_option(compare)


def build_source(args: argparse.Namespace) -> Source:
    if not args.source or not args.dataroot:
        raise EvalUsageError("--source and --dataroot are required")
    return open_source(args.source, args.dataroot, cameras=parse_cameras(args.source, args.cameras),
                       version=args.version, frame=args.frame,
                       scenes=[s.strip() for s in args.scenes.split(",")] if args.scenes else None,
                       stride=args.stride, image_topic=args.image_topic, odom_topic=args.odom_topic,
                       route_topic=args.route_topic)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse before any work: the model, the dataset and the run directory, each named by its flag."""
    if bool(args.checkpoint) == bool(args.bundle):
        raise EvalUsageError("pass exactly one of --checkpoint (torch) and --bundle (ONNX Runtime)")
    if not args.source or not args.dataroot:
        raise EvalUsageError("--source and --dataroot are required")
    if args.checkpoint:
        existing_dir("--checkpoint", args.checkpoint)  # a checkpoint or a quantize output: detect_source tells
    else:
        existing_dir("--bundle", args.bundle, holding="manifest.json")
    existing_path("--dataroot", args.dataroot)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is a file; --out is the run directory (results.jsonl, "
                        "report/): give a directory")


def run(args: argparse.Namespace, *, restore_quantized: RestoreQuantized | None = None) -> int:
    """``blockpilot eval`` (``restore_quantized``: how a quantize output given as ``--checkpoint`` is restored)."""
    if args.eval_command == "compare":
        from .compare import compare_runs, format_comparison

        if args.compare_out and Path(args.compare_out).is_file():
            raise UserError(f"--out {args.compare_out}: exists and is a file; give a directory for compare.md")
        result = compare_runs(args.run_a, args.run_b, out_dir=args.compare_out)
        emit(args, result, format_comparison(result))
        return 0
    if args.bundle and getattr(args, "schema", None):
        raise EvalUsageError("--schema applies to --checkpoint; a bundle decodes with the schema it was exported with")
    if args.bundle and args.dtype != "auto":
        raise EvalUsageError(f"--dtype {args.dtype} applies to --checkpoint; a bundle runs in the dtype it was "
                             "exported in")
    from .ray_cli import check_ray_arguments

    check_ray_arguments(args)
    if getattr(args, "compare_bundle", None) and not args.closed_loop:
        raise EvalUsageError("--compare-bundle applies to --closed-loop --world driving")
    if args.closed_loop:
        from .robot_closed_loop_cli import run_closed_loop_command

        return run_closed_loop_command(args, restore_quantized=restore_quantized)
    check_arguments(args)
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import detect_source, open_planner

    robot = args.source in ROBOT_SOURCES
    if robot:
        from .robot_eval import open_robot_source

        cameras = None if not args.cameras or args.cameras == "all" else [c.strip() for c in args.cameras.split(",")]
        source: Source = open_robot_source(args.dataroot, cameras=cameras)
    else:
        source = build_source(args)
    flag = "--bundle" if args.bundle else "--checkpoint"
    found = detect_source(args.bundle or args.checkpoint, flag=flag,
                          kinds=("bundle",) if args.bundle else ("checkpoint", "quantized"))
    settings = DecoderSettings(name=args.decoder, threshold=args.threshold, rollouts=args.rollouts)
    if args.threads and not args.bundle:
        import torch

        torch.set_num_threads(args.threads)
    model_path = found.path
    spec = getattr(args, "schema", None)
    if args.bundle:
        schema = None
    elif robot:
        from ..vla.schema_io import resolve_schema

        schema = None if spec is None else resolve_schema(found.checkpoint or model_path, spec)
    else:
        schema = driving_schema(found.checkpoint or model_path, spec)
    backend = getattr(args, "backend", "auto")
    options = dict(backend=backend, decoder=settings, device=args.device, dtype=args.dtype,
                   max_prompt_tokens=args.max_prompt_tokens, schema=schema,
                   cameras=len(getattr(source, "cameras", ("one",))), threads=args.threads or 1,
                   restore_quantized=restore_quantized, flag=flag, trusted_keys=args.trusted_keys)
    if args.ray:
        from .ray_cli import RaySession

        with RaySession(args, found, options) as session:
            if robot:
                return _replay_robot(args, session.planner, source, map_plans=session.robot_replay_mapper())
            return _replay(args, session.planner, source, found, map_samples=session.replay_mapper())
    planner = open_planner(found, **options)
    if robot:
        return _replay_robot(args, planner, source)
    return _replay(args, planner, source, found)


def _replay_robot(args: argparse.Namespace, planner: Any, source: Source, map_plans: Any = None) -> int:
    """The LeRobot replay of ``source`` into ``--out`` (``map_plans``: planned on Ray workers) and its exit code."""
    from .robot_eval import run_robot

    code = run_robot(planner, source, Path(args.out), limit=args.limit, quiet=args.json, map_plans=map_plans)
    if args.json:
        print((Path(args.out) / "report" / "metrics.json").read_text(), end="")
    return code


def _replay(args: argparse.Namespace, planner: Any, source: Source, found: Any, map_samples: Any = None) -> int:
    """The replay of ``source`` into ``--out`` (``map_samples``: planned on Ray workers), its report and exit code."""
    backend = getattr(args, "backend", "auto")
    header = run_header(source, found.path, planner)
    header["backend"] = found.default_backend if backend == "auto" else backend
    if not args.bundle:
        header["dtype"] = getattr(planner.backend, "dtype", None)  # what auto resolved to; a resume must match it
    if found.kind == "quantized":
        header["quantized"] = str(found.quantized.resolve()) if found.quantized else None
    code = evaluate_and_report(planner, source, Path(args.out), header=header, limit=args.limit,
                               overwrite=args.overwrite, progress=not args.no_progress, quiet=args.json,
                               map_samples=map_samples)
    if args.json:
        from .evaluator import REPORT_DIR

        print((Path(args.out) / REPORT_DIR / "metrics.json").read_text(), end="")
    return code


