"""The ``blockpilot`` command line. Each command imports its work lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UserError(Exception):
    """An error the CLI reports as one line (bad path, bad checkpoint, bad config) and exit code 2."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), seed=args.seed, image_size=args.image_size)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .vla.loader import describe_checkpoint

    print(describe_checkpoint(Path(args.checkpoint)))
    return 0


def _cmd_scaffold(args: argparse.Namespace) -> int:
    from .demo import print_scaffold

    print_scaffold(schema_name=args.schema, checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockpilot",
        description="Deploy block-diffusion vision-language-action models on robots and cars.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="end-to-end CPU demo on the reference model")
    demo.add_argument("--out", default="runs/demo", help="directory for the demo checkpoint and outputs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--image-size", type=int, default=112, help="camera image side in pixels")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="validate and load a local HF checkpoint, print its config")
    inspect.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors)")
    inspect.set_defaults(func=_cmd_inspect)

    scaffold = sub.add_parser("scaffold", help="print the frozen answer scaffold of a schema")
    scaffold.add_argument("--schema", default="driving-nuscenes",
                          choices=["driving-nuscenes", "driving-wod", "robot"])
    scaffold.add_argument("--checkpoint", default=None,
                          help="checkpoint dir with config.json and tokenizer.json (default: reference tokenizer)")
    scaffold.set_defaults(func=_cmd_scaffold)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from .vla.checkpoint import CheckpointError
    from .vla.config import ConfigError

    try:
        return func(args)
    except (UserError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"blockpilot {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
