"""The ``blockpilot`` command line. Each command imports its work lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .atomic_io import atomic_write
from .cli_common import UserError

__all__ = ["UserError", "build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), seed=args.seed, image_size=args.image_size, heldout_scenes=args.heldout_scenes)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if (path / "manifest.json").is_file():
        from .formats.bundle import BundleError, describe_bundle
        from .vla.image_policy import ImagePolicyError, describe_bundle_images

        try:
            print(describe_bundle(path))
            print(describe_bundle_images(path))
        except (BundleError, ImagePolicyError) as exc:
            raise UserError(str(exc)) from None
        return 0
    from .vla.image_policy import describe_checkpoint_images
    from .vla.loader import describe_checkpoint

    print(describe_checkpoint(path))
    print(describe_checkpoint_images(path))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.build import export_bundle
    from .export.progress import Progress
    from .export.targets import EngineTargetError
    from .export.trt_build import TrtUnavailableError
    from .formats.bundle import BundleError
    from .quant.recipes import RecipeError
    from .quant.targets import TargetError

    try:
        summary = export_bundle(Path(args.checkpoint), Path(args.out), max_prompt_tokens=args.max_prompt_tokens,
                                with_weights=args.with_weights, overwrite=args.overwrite,
                                targets=tuple(t.strip() for t in (args.target or "").split(",") if t.strip()),
                                engine_precision=args.engine_precision, recipe=args.recipe, calib=args.calib,
                                attention=args.attention, progress=Progress(enabled=False if args.quiet else None),
                                timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                                schema=args.schema, image_sizes=tuple(args.image_size or ()),
                                cameras=args.cameras, dtype=args.dtype)
    except (BundleError, RecipeError, TargetError, EngineTargetError, TrtUnavailableError) as exc:
        raise UserError(str(exc)) from None
    print(summary.table())
    return 0


def _cmd_scaffold(args: argparse.Namespace) -> int:
    from .demo import SCHEMAS, print_scaffold
    from .vla.json_schema import load_json_schema
    from .vla.slots import SchemaError

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if args.schema not in SCHEMAS and not Path(args.schema).is_file():
        raise UserError(f"--schema {args.schema!r} is neither a preset ({', '.join(SCHEMAS)}) nor a JSON Schema file")
    try:
        schema = args.schema if args.schema in SCHEMAS else load_json_schema(args.schema)
        print_scaffold(schema_name=schema, checkpoint=checkpoint)
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    return 0


def _image_size(text: str) -> tuple[int, int]:
    from .vla.image_policy import ImagePolicyError, parse_image_size

    try:
        return parse_image_size(text)
    except ImagePolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _restore_quantized(model: object, directory: Path) -> object:
    """What ``blockpilot quantize`` wrote, restored onto a fresh model: how ``plan`` and ``eval`` open a quantize
    output (the runtime takes it as ``restore_quantized``; it never imports quant itself). Model Optimizer's
    progress lines go to stderr: ``plan`` prints its JSON on stdout."""
    import contextlib

    from .quant.apply import load_quantized

    with contextlib.redirect_stdout(sys.stderr):
        return load_quantized(model, directory)  # type: ignore[arg-type]


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan_cli import run

    return run(args, restore_quantized=_restore_quantized)


def _cmd_train_reference(args: argparse.Namespace) -> int:
    from .vla.train.trainer import run

    run(args)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .calibration.sets import CalibrationError
    from .quant.apply import QuantizedCheckpointError
    from .quant.cli import run
    from .quant.recipes import RecipeError
    from .quant.targets import TargetError

    try:
        return run(args)
    except (RecipeError, TargetError, CalibrationError, QuantizedCheckpointError) as exc:
        raise UserError(str(exc)) from None


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from .export.verify import verify_bundle
    from .formats.bundle import BundleError
    from .runtime.backend import BackendError

    try:
        report = verify_bundle(Path(args.bundle), args.checkpoint, samples=args.samples, tolerance=args.tolerance,
                               backend=args.backend)
    except (BundleError, BackendError) as exc:
        raise UserError(str(exc)) from None
    print(report.text())
    if args.json:
        atomic_write(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.passed else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.cli import run

    return run(args, restore_quantized=_restore_quantized)


def _cmd_ros(args: argparse.Namespace) -> int:
    from .ros_nodes.cli import run, user_errors

    try:
        return run(args)
    except user_errors() as exc:
        raise UserError(str(exc)) from None


def _cmd_jetson(args: argparse.Namespace) -> int:
    from .jetson.cli import run, user_errors

    try:
        return run(args)
    except user_errors() as exc:
        raise UserError(str(exc)) from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.cli import run
    from .bench.run import BenchError

    try:
        return run(args)
    except BenchError as exc:
        raise UserError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from .vla.schema_io import add_schema_option

    parser = argparse.ArgumentParser(
        prog="blockpilot",
        description="Deploy block-diffusion vision-language-action models on robots and cars.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="end-to-end CPU demo on the reference model")
    demo.add_argument("--out", default="runs/demo", help="directory for the demo checkpoint and outputs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--image-size", type=int, default=112, help="camera image side in pixels")
    demo.add_argument("--heldout-scenes", type=int, default=10,
                      help="held-out generated scenes to evaluate the shipped reference model on (0: skip)")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="validate a local HF checkpoint or a bundle (hashes checked), describe it")
    inspect.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors) or bundle directory")
    inspect.set_defaults(func=_cmd_inspect)

    scaffold = sub.add_parser("scaffold", help="print the frozen answer scaffold of a schema")
    scaffold.add_argument("--schema", default="driving-nuscenes",
                          help="driving-nuscenes, driving-wod, robot, or a JSON Schema file (the supported subset: "
                               "fixed keys, fixed-length arrays, enums, booleans, bounded numbers and strings)")
    scaffold.add_argument("--checkpoint", default=None,
                          help="checkpoint dir with config.json and tokenizer.json (default: reference tokenizer)")
    scaffold.set_defaults(func=_cmd_scaffold)

    plan = sub.add_parser("plan", help="plan once: from camera images (none for a text-only model), ego state and "
                                       "route command, or from --prompt TEXT in any --schema; print JSON (exit 3: "
                                       "the answer did not parse)")
    from .plan_cli import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)
    train = sub.add_parser("train-reference",
                           help="train the reference model on generated scenes (block-diffusion recipe)")
    from .vla.train.trainer import add_arguments

    add_arguments(train)
    train.set_defaults(func=_cmd_train_reference)

    export = sub.add_parser("export", help="export a checkpoint to a verified bundle (ONNX graphs for the "
                                           "ONNX Runtime backend, config, tokenizer, schema, sha256 manifest)")
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint dir (config.json, safetensors, tokenizer.json), or what blockpilot quantize "
                             "wrote (its --out dir; fp8)")
    export.add_argument("--out", required=True, help="bundle directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    export.add_argument("--with-weights", action="store_true", help="also copy the safetensors (torch backend)")
    export.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt budget the KV cache is sized for (default: --cameras frames of the largest "
                             "--image-size under the checkpoint's image policy, at least 1024)")
    export.add_argument("--image-size", action="append", type=_image_size, default=None, metavar="WxH",
                        help="camera resolution the vision graphs take, e.g. 1600x900 (repeatable: one graph per "
                             "resized size; default 112x112); other sizes are resized to the nearest exported one")
    export.add_argument("--cameras", type=int, default=1, help="cameras per prompt the KV cache is sized for")
    export.add_argument("--target", default=None,
                        help="also build TensorRT engines (comma-separated): rtx, rtx-blackwell (TensorRT-RTX, ahead "
                             "of time on any machine); orin, thor, h100 (TensorRT proper, on that device)")
    export.add_argument("--engine-precision", default="fp16", choices=["fp32", "fp16"], help="engine precision")
    export.add_argument("--recipe", default=None, choices=["fp8"],
                        help="quantize with modelopt first (FP8 Q/DQ graphs and engines)")
    export.add_argument("--calib", type=int, default=32, help="calibration samples for --recipe")
    export.add_argument("--attention", default="auto", choices=["auto", "decomposed", "native", "plugin"],
                        help="LM-step engines' attention: TensorRT's attention layer (native), the "
                             "BlockDiffusionAttention plugin, or plain ops (decomposed); auto: the target's")
    export.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                        help="dtype the model is loaded and traced in: auto = the checkpoint's stored dtype (bf16/fp16 "
                             "checkpoints never make a float32 copy; the graphs are widened to float32 exactly); "
                             "float32 = convert first (the previous path)")
    export.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")
    export.add_argument("--timing-cache", default=None,
                        help="TensorRT timing cache file, read and updated by every engine build (TensorRT proper)")
    add_schema_option(export)
    export.set_defaults(func=_cmd_export)

    verify = sub.add_parser("verify", help="check a bundle: its TensorRT engines against its ONNX graphs (Polygraphy, "
                                           "on a GPU), or its ONNX Runtime backend against the torch backend")
    verify.add_argument("bundle", help="bundle directory")
    verify.add_argument("--checkpoint", default=None, help="reference checkpoint (default: the bundle's weights)")
    verify.add_argument("--samples", type=int, default=8, help="held-out observations to compare")
    verify.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed probability difference")
    verify.add_argument("--json", default=None, help="also write the report here")
    verify.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                        help="tensorrt: the bundle's engines against its ONNX graphs through Polygraphy (needs a GPU "
                             "that runs them); onnxruntime: ONNX Runtime against torch; auto: tensorrt where it runs")
    verify.set_defaults(func=_cmd_verify)

    evaluate = sub.add_parser("eval", help="replay nuScenes / WOD-E2E / rosbag2 logs through the planner; "
                                           "metrics and report (eval compare A B: two runs side by side)")
    from .eval.cli import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    quantize = sub.add_parser("quantize", help="quantize a checkpoint with modelopt (fp8, nvfp4, w4a8, int8_sq, "
                                               "mixed, auto) for a target; optional replay quality gate")
    from .quant.cli import add_arguments as add_quant_arguments

    add_quant_arguments(quantize)
    quantize.set_defaults(func=_cmd_quantize)

    ros = sub.add_parser("ros", help="ROS 2 nodes: planner (lifecycle), replay a rosbag2, record a run; "
                                     "score a recorded run against its source bag")
    from .ros_nodes.cli import add_arguments as add_ros_arguments

    add_ros_arguments(ros)
    ros.set_defaults(func=_cmd_ros)

    jetson = sub.add_parser("jetson", help="on a Jetson: platform and versions, on-device engine build, power modes, "
                                           "device benchmark with tegrastats")
    from .jetson.cli import add_arguments as add_jetson_arguments

    add_jetson_arguments(jetson)
    jetson.set_defaults(func=_cmd_jetson)

    bench = sub.add_parser("bench", help="block-step forwards vs the memory roofline, AR vs transformers, plans per "
                                         "decoder, in one run (GPU: the cuda backend; CPU: torch and ONNX Runtime)")
    from .bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from .eval.cli import USER_ERRORS
    from .eval.records import ResultsFileError
    from .runtime.backend import BackendError
    from .vla.checkpoint import CheckpointError
    from .vla.config import ConfigError

    reported: tuple[type[Exception], ...] = (UserError, CheckpointError, ConfigError, FileNotFoundError,
                                             ResultsFileError, BackendError, *USER_ERRORS)
    try:
        return func(args)
    except reported as exc:
        print(f"blockpilot {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
