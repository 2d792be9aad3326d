"""The ``blockpilot`` command line. Each command imports its work lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .vla.prompt import EgoState


class UserError(Exception):
    """An error the CLI reports as one line (bad path, bad checkpoint, bad config) and exit code 2."""


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
                                cameras=args.cameras)
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


def _read_ego(value: str) -> EgoState:
    """``--ego``: inline JSON (``{"past": [[x, y], ...], "speed": m/s, "accel": m/s2}``) or a file of it."""
    import json

    import numpy as np

    from .vla.prompt import EgoState, PromptError, check_ego_history

    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--ego: {value!r} is neither inline JSON nor an existing file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--ego: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError("--ego: expected a JSON object with keys past, speed, accel")
    missing, unknown = {"past", "speed", "accel"} - set(data), set(data) - {"past", "speed", "accel"}
    if missing or unknown:
        raise UserError(f"--ego: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                        "expected past, speed, accel")
    try:
        ego = EgoState(np.asarray(data["past"], dtype=np.float64), float(data["speed"]), float(data["accel"]))
        check_ego_history(ego.past_waypoints)
        return ego
    except (PromptError, TypeError, ValueError) as exc:
        raise UserError(f"--ego: {exc}") from None


def _read_images(value: str) -> list[Any]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images: list[Any] = []
    for name in value.split(","):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--image: no such file {name!r}")
        try:
            with Image.open(path) as im:
                images.append(np.array(im.convert("RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"--image: cannot read {name!r} as an image ({exc})") from None
    return images


def _image_size(text: str) -> tuple[int, int]:
    from .vla.image_policy import ImagePolicyError, parse_image_size

    try:
        return parse_image_size(text)
    except ImagePolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .runtime.backend import BackendError
    from .runtime.plan_types import DecoderSettings, Observation
    from .runtime.planner import Planner
    from .vla.config import ConfigError
    from .vla.plans import DrivingSchema
    from .vla.schema_io import resolve_schema

    ego = _read_ego(args.ego)
    images = _read_images(args.image) if args.image else []
    try:
        schema = resolve_schema(Path(args.checkpoint), args.schema) if args.schema else None
        if schema is not None and not isinstance(schema, DrivingSchema):
            raise UserError(f"--schema {args.schema}: plan assembles the driving prompt and needs a driving schema, "
                            f"got {type(schema).__name__}")
        settings = DecoderSettings(name=args.decoder, threshold=args.threshold, rollouts=args.rollouts,
                                   temperature=args.temperature, seed=args.seed,
                                   sub_block_cache=args.sub_block_cache, sub_block_rule=args.sub_block_rule,
                                   softmax_dtype=args.softmax_dtype)
        planner = Planner.from_checkpoint(Path(args.checkpoint), decoder=settings, device=args.device,
                                          max_prompt_tokens=args.max_prompt_tokens, schema=schema,
                                          cameras=len(images))
        if planner.config.vision is None and images:
            raise UserError(f"--image: {args.checkpoint} is a text-only model (no vision_config in config.json); "
                            "leave --image out to plan from the ego state and route command alone")
        if planner.config.vision is not None and not images:
            raise UserError(f"--image is required: {args.checkpoint} has a vision tower (vision_config in "
                            "config.json) and plans from camera images")
        plan = planner.plan(Observation(images, ego, args.route_command))
    except (BackendError, ConfigError) as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(plan.to_dict(), indent=2))
    if plan.plan is None:
        # Exit 3: the model answered, the JSON above holds its text, but no plan came out of it.
        print(f"blockpilot plan: the answer did not parse: {plan.error}", file=sys.stderr)
        return 3
    return 0


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
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.passed else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.cli import run

    return run(args)


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

    plan = sub.add_parser("plan", help="plan once from camera images (none for a text-only model), ego state and "
                                       "route command; print JSON (exit 3: the answer did not parse)")
    plan.add_argument("--checkpoint", required=True, help="checkpoint dir (config.json, safetensors, tokenizer)")
    plan.add_argument("--image", default=None, help="camera image file(s), comma-separated, in prompt order "
                                                   "(required for a model with a vision tower; refused without one)")
    plan.add_argument("--ego", required=True,
                      help='ego state as JSON or a JSON file: {"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], '
                           '"speed": 5.0, "accel": 0.0} (the 4 positions 2.0, 1.5, 1.0, 0.5 s ago in the ego frame, '
                           'x forward, y left, oldest first)')
    add_schema_option(plan)
    plan.add_argument("--command", dest="route_command", default="go straight",
                      help="route command: turn left, go straight, turn right (default: go straight)")
    plan.add_argument("--decoder", default="scaffold", choices=["ar", "ar_free", "block", "scaffold", "rollouts"],
                      help="ar: scaffold-constrained greedy baseline; ar_free / block: free text; scaffold: "
                           "Fast-dDrive speculative; rollouts: N sampled trajectories (default: scaffold)")
    plan.add_argument("--rollouts", type=int, default=4, help="trajectories for --decoder rollouts")
    plan.add_argument("--temperature", type=float, default=0.5, help="sampling temperature for rollouts")
    plan.add_argument("--threshold", type=float, default=None,
                      help="confidence threshold (default: 0.9 for block, 0.0 for scaffold and rollouts)")
    plan.add_argument("--sub-block-cache", action="store_true", help="block decoder: reuse the block's KV")
    plan.add_argument("--sub-block-rule", default="published", choices=["published", "window"],
                      help="with --sub-block-cache: published (Fast-dLLM v2: whole block while the sub-block's first "
                           "token is masked, else the sub-block alone) or window (whole block once per sub-block, "
                           "else the sub-block plus one position); default: published")
    plan.add_argument("--softmax-dtype", default="float32", choices=["float32", "model"],
                      help="confidence arithmetic: float32, or the model's dtype as the published generate "
                           "(bf16 ties near 1.0 go to the first position); torch backend (default: float32)")
    plan.add_argument("--seed", type=int, default=0, help="rollout sampling seed")
    plan.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    plan.add_argument("--max-prompt-tokens", type=int, default=None,
                      help="prompt budget the KV cache is sized for (default: from the image policy and cameras)")
    plan.set_defaults(func=_cmd_plan)
    train = sub.add_parser("train-reference",
                           help="train the reference model on generated scenes (block-diffusion recipe)")
    from .vla.train.trainer import add_arguments

    add_arguments(train)
    train.set_defaults(func=_cmd_train_reference)

    export = sub.add_parser("export", help="export a checkpoint to a verified bundle (ONNX graphs for the "
                                           "ONNX Runtime backend, config, tokenizer, schema, sha256 manifest)")
    export.add_argument("--checkpoint", required=True, help="checkpoint dir (config.json, safetensors, tokenizer.json)")
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
