"""The ``blockpilot`` command line. Each command imports its work lazily so ``--help`` stays fast.

Errors are handled once, in :func:`main`: a :class:`~blockpilot.errors.BlockpilotError` (a bad flag, file or
value: the user's to fix) is one line on stderr and its exit code (2; 1 for ``eval compare`` runs that cannot be
compared); argparse's own errors are one line and exit 2 too; Ctrl-C exits 130; a closed stdout (``| head``)
exits quietly. Anything else is the program's fault and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .cli_common import (
    UserError,
    about,
    add_json_option,
    add_trusted_key_option,
    bounded,
    emit,
    existing_dir,
    fraction,
    one_line,
    positive_int,
    quiet_stdout,
    writable_target,
)
from .errors import BlockpilotError, require_extra

__all__ = ["UserError", "build_parser", "main"]
INTERRUPTED = "interrupted; rerun with the same --out to resume"


def _cmd_demo(args: argparse.Namespace) -> int:
    writable_target("--out", args.out, directory=True)
    require_extra("torch", "export", "demo")
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), seed=args.seed, image_size=args.image_size, heldout_scenes=args.heldout_scenes,
             robot_episodes=args.robot_episodes)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint or bundle directory")
    if (path / "manifest.json").is_file():
        from .formats.bundle import describe_bundle
        from .formats.onnx_spec import describe_bundle_images

        print(describe_bundle(path))
        print(describe_bundle_images(path))
        return 0
    existing_dir("CHECKPOINT", path, holding="config.json")
    from .vla.image_policy import describe_checkpoint_images
    from .vla.loader import describe_checkpoint

    print(describe_checkpoint(path))
    print(describe_checkpoint_images(path))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    existing_dir("--checkpoint", args.checkpoint, holding="config.json")
    writable_target("--out", args.out, overwrite=args.overwrite, directory=True)
    if args.timing_cache:
        writable_target("--timing-cache", args.timing_cache)
    from .formats.signing import load_signing_key

    signer = load_signing_key(args.sign) if args.sign else None  # a bad key is refused before any work
    from .export.targets import check_export_request
    from .quant.cli import check_closed_loop_gate

    targets = check_export_request(args.target, args.recipe)
    check_closed_loop_gate(args)
    require_extra("torch", "export", "export (tracing the checkpoint)")
    if args.recipe:
        require_extra("modelopt", "quant", f"export --recipe {args.recipe}")
    from .export.bundle_export import export_bundle
    from .export.progress import StageProgress

    summary = export_bundle(Path(args.checkpoint), Path(args.out), max_prompt_tokens=args.max_prompt_tokens,
                            with_weights=args.with_weights, overwrite=args.overwrite, targets=targets,
                            engine_precision=args.engine_precision, recipe=args.recipe, calib=args.calib,
                            attention=args.attention, progress=StageProgress(enabled=False if args.quiet else None),
                            timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                            schema=args.schema, image_sizes=tuple(args.image_size or ()),
                            cameras=args.cameras, dtype=args.dtype, sign=signer)
    emit(args, dataclasses.asdict(summary), summary.table())
    if args.gate_closed_loop:
        from .export.gate_cli import run_export_gate

        return run_export_gate(args, Path(args.out))
    return 0


def _cmd_scaffold(args: argparse.Namespace) -> int:
    require_extra("torch", "torch", "scaffold")
    from .demo import SCHEMAS, print_scaffold
    from .vla.json_schema import load_json_schema

    checkpoint = existing_dir("--checkpoint", args.checkpoint) if args.checkpoint else None
    if args.schema not in SCHEMAS and not Path(args.schema).is_file():
        raise UserError(f"--schema {args.schema!r} is neither a preset ({', '.join(SCHEMAS)}) nor a JSON Schema file")
    with about(f"--schema {args.schema}"):
        schema = args.schema if args.schema in SCHEMAS else load_json_schema(args.schema)
    print_scaffold(schema_name=schema, checkpoint=checkpoint)
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
    from .train.commands import train_reference

    return train_reference(args)


def _cmd_train_robot(args: argparse.Namespace) -> int:
    from .eval.robot_closed_loop import open_planner_policy
    from .train.commands import train_robot

    return train_robot(args, open_planner_policy)


def _cmd_quantize(args: argparse.Namespace) -> int:
    require_extra("modelopt", "quant", "quantize")
    from .quant.cli import run

    return run(args)


def _cmd_verify(args: argparse.Namespace) -> int:
    existing_dir("BUNDLE", args.bundle, holding="manifest.json")
    if args.checkpoint:
        existing_dir("--checkpoint", args.checkpoint)  # a checkpoint or a quantize output: verify_bundle tells
    if args.json_out:
        writable_target("--json-out", args.json_out)
    if args.dataroot:
        existing_dir("--dataroot", args.dataroot)
    from .export.verify import verify_bundle

    report = verify_bundle(Path(args.bundle), args.checkpoint, samples=args.samples, tolerance=args.tolerance,
                           backend=args.backend, trusted_keys=args.trusted_keys, dataroot=args.dataroot,
                           restore_quantized=_restore_quantized)
    emit(args, report.to_dict(), report.text())
    return 0 if report.passed else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.cli import run

    return run(args, restore_quantized=_restore_quantized)


def _cmd_ros(args: argparse.Namespace) -> int:
    from .ros_nodes.cli import run

    return run(args)


def _cmd_jetson(args: argparse.Namespace) -> int:
    from .jetson.cli import run

    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.cli import run

    return run(args)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the message and where the help is), exit 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _package_command(sub: argparse._SubParsersAction[_Parser], name: str, help: str,
                     add_arguments: Callable[[argparse.ArgumentParser], None],
                     func: Callable[[argparse.Namespace], int]) -> None:
    """A subcommand whose flags its package's command-line module defines (``add_arguments``) and ``func`` runs."""
    parser = sub.add_parser(name, help=help)
    add_arguments(parser)
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from .vla.schema_io import add_schema_option

    parser = _Parser(
        prog="blockpilot",
        description="Deploy block-diffusion vision-language-action models on robots and cars.",
        epilog="exit status: 0 done; 1 a check failed (verify, eval, quantize --gate, export --gate-closed-loop, "
               "bench) or eval compare found nothing to compare; 2 bad input (one line on stderr names the flag or "
               "file); 3 plan's answer did not parse; 130 interrupted. --json on any command that has it prints "
               "JSON on stdout instead of text.",
    )
    parser.add_argument("--version", action="version", version=f"blockpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="end-to-end CPU demo on the reference model")
    demo.add_argument("--out", default="runs/demo", help="directory for the demo checkpoint and outputs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--image-size", type=bounded(int, 28), default=112, help="camera image side in pixels (>= 28)")
    demo.add_argument("--heldout-scenes", type=bounded(int, 0), default=10,
                      help="held-out generated scenes to evaluate the shipped reference model on (0: skip)")
    demo.add_argument("--robot-episodes", type=bounded(int, 0), default=10,
                      help="held-out SO-101 episodes the shipped robot model runs in closed loop (0: skip)")
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

    from .plan_cli import add_arguments as add_plan_arguments

    _package_command(sub, "plan", "plan once: from camera images (none for a text-only model), ego state and route "
                                  "command, or from --prompt TEXT in any --schema; print JSON (exit 3: the answer did "
                                  "not parse)", add_plan_arguments, _cmd_plan)

    from .train.options import add_arguments as add_train_arguments

    _package_command(sub, "train-reference", "train the reference model on generated scenes (block-diffusion recipe)",
                     add_train_arguments, _cmd_train_reference)

    from .train.robot_options import add_robot_arguments

    _package_command(sub, "train-robot", "train the SO-101 manipulation model on the simulator's expert rollouts "
                                         "(DART noise, so101-ee action chunks, block-diffusion recipe)",
                     add_robot_arguments, _cmd_train_robot)

    export = sub.add_parser("export", help="export a checkpoint to a verified bundle (ONNX graphs for the "
                                           "ONNX Runtime backend, config, tokenizer, schema, sha256 manifest)")
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint dir (config.json, safetensors, tokenizer.json), or what blockpilot quantize "
                             "wrote (its --out dir; fp8)")
    export.add_argument("--out", required=True, help="bundle directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    export.add_argument("--with-weights", action="store_true", help="also copy the safetensors (torch backend)")
    export.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="prompt budget the KV cache is sized for (default: --cameras frames of the largest "
                             "--image-size under the checkpoint's image policy, at least 1024)")
    export.add_argument("--image-size", action="append", type=_image_size, default=None, metavar="WxH",
                        help="camera resolution the vision graphs take, e.g. 1600x900 (repeatable: one graph per "
                             "resized size; default 112x112); other sizes are resized to the nearest exported one")
    export.add_argument("--cameras", type=positive_int, default=1, help="cameras per prompt the KV cache is sized for")
    export.add_argument("--target", default=None,
                        help="also build TensorRT engines (comma-separated): rtx (alias rtx-ada), rtx-blackwell "
                             "(TensorRT-RTX, ahead of time on any machine); orin, thor, h100 (TensorRT proper, on that "
                             "device); cpu: no engines (the ONNX Runtime graphs every bundle has); the names "
                             "`blockpilot quantize --target` takes")
    export.add_argument("--engine-precision", default="fp16", choices=["fp32", "fp16"], help="engine precision")
    from .quant.cli import RECIPE_NAMES, add_closed_loop_gate_arguments

    export.add_argument("--recipe", default=None, choices=RECIPE_NAMES,
                        help="quantize with modelopt first; each --target's precision gate must allow the recipe "
                             "(the same recipes as `blockpilot quantize`); bundles carry fp8 (FP8 Q/DQ graphs and "
                             "engines) today")
    export.add_argument("--calib", type=positive_int, default=32, help="calibration samples for --recipe")
    export.add_argument("--attention", default="auto", choices=["auto", "decomposed", "native", "plugin"],
                        help="LM-step engines' attention: TensorRT's attention layer (native), the "
                             "BlockDiffusionAttention plugin, or plain ops (decomposed); auto: the target's, with the "
                             "plugin only where torch and Triton import (else decomposed)")
    export.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                        help="dtype the model is loaded and traced in: auto = the checkpoint's stored dtype (bf16/fp16 "
                             "checkpoints never make a float32 copy; the graphs are widened to float32 exactly); "
                             "float32 = convert first (the previous path)")
    export.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")
    export.add_argument("--timing-cache", default=None,
                        help="TensorRT timing cache file, read and updated by every engine build (TensorRT proper)")
    export.add_argument("--sign", default=None, metavar="KEY",
                        help="sign the manifest with this Ed25519 private key (PKCS#8 PEM, from blockpilot keygen)")
    add_closed_loop_gate_arguments(export.add_argument_group("closed-loop gate (bundle vs checkpoint, <out>-gate/)"))
    add_schema_option(export)
    add_json_option(export)
    export.set_defaults(func=_cmd_export)

    verify = sub.add_parser("verify", help="check a bundle: its TensorRT engines against its ONNX graphs (Polygraphy, "
                                           "on a GPU), or its ONNX Runtime backend against the torch backend")
    verify.add_argument("bundle", help="bundle directory")
    verify.add_argument("--checkpoint", default=None,
                        help="reference checkpoint, or the blockpilot quantize output an fp8 bundle was exported from "
                             "(default: the bundle's weights)")
    verify.add_argument("--samples", type=positive_int, default=8, help="held-out observations to compare")
    verify.add_argument("--dataroot", default=None,
                        help="LeRobot dataset whose frames an action-chunk bundle is verified on (driving bundles "
                             "use generated scenes)")
    verify.add_argument("--tolerance", type=fraction, default=1e-4,
                        help="largest allowed probability difference (0 to 1)")
    add_json_option(verify, file_help="also write the JSON report here (was --json PATH)")
    verify.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                        help="tensorrt: the bundle's engines against its ONNX graphs through Polygraphy (needs a GPU "
                             "that runs them); onnxruntime: ONNX Runtime against torch; auto: tensorrt where it runs")
    add_trusted_key_option(verify)
    verify.set_defaults(func=_cmd_verify)

    from .export.signing_cli import add_commands as add_signing_commands

    add_signing_commands(sub)  # keygen, sign
    from .eval.cli import add_arguments as add_eval_arguments

    _package_command(sub, "eval", "replay nuScenes / WOD-E2E / rosbag2 logs through the planner; metrics and report "
                                  "(eval compare A B: two runs side by side)", add_eval_arguments, _cmd_eval)

    from .quant.cli import add_arguments as add_quant_arguments

    _package_command(sub, "quantize", "quantize a checkpoint with modelopt (fp8, nvfp4, w4a8, int8_sq, mixed, auto) "
                                      "for a target; optional replay quality gate", add_quant_arguments, _cmd_quantize)

    from .ros_nodes.cli import add_arguments as add_ros_arguments

    _package_command(sub, "ros", "ROS 2 nodes: planner (lifecycle), replay a rosbag2, record a run; score a recorded "
                                 "run against its source bag", add_ros_arguments, _cmd_ros)

    from .jetson.cli import add_arguments as add_jetson_arguments

    _package_command(sub, "jetson", "on a Jetson: platform and versions, on-device engine build, power modes, device "
                                    "benchmark with tegrastats", add_jetson_arguments, _cmd_jetson)

    from .bench.cli import add_arguments as add_bench_arguments

    _package_command(sub, "bench", "block-step forwards vs the memory roofline, AR vs transformers, plans per "
                                   "decoder, in one run (GPU: the cuda backend; CPU: torch and ONNX Runtime)",
                     add_bench_arguments, _cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. argparse errors (and ``--help`` / ``--version``) end in ``SystemExit`` as usual."""
    prog = "blockpilot"
    try:
        args = build_parser().parse_args(argv)
        prog = f"blockpilot {args.command}"
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BlockpilotError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: {INTERRUPTED}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `blockpilot inspect DIR | head -1`: the reader has what it wanted
        quiet_stdout()
        return 141  # 128 + SIGPIPE, what a command killed by the closed pipe reports


if __name__ == "__main__":
    sys.exit(main())
