"""``blockpilot eval --closed-loop``: the options (:func:`add_closed_loop_arguments`) and the command
(:func:`run_closed_loop_command`). It is a mode of ``eval`` rather than its own command because it takes the same
model options (``--checkpoint``/``--bundle``, ``--backend``, ``--decoder``, ``--schema``, ``--out``, ``--overwrite``,
``--json``), resolved the same way; only the dataset options give way to the simulator's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli_common import UserError, existing_dir, positive_int
from .robot_closed_loop import HELD_OUT_START, ClosedLoopUsageError, parse_seeds

if TYPE_CHECKING:
    from ..runtime.sources import RestoreQuantized

BASELINES = ("expert", "hold")
DEFAULT_SEEDS = f"{HELD_OUT_START}:{HELD_OUT_START + 20}"


def add_closed_loop_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("closed loop (--closed-loop: the planner drives the SO-101 arm in MuJoCo, or "
                                      "with --world driving the car in the synthetic driving world)")
    group.add_argument("--closed-loop", action="store_true",
                       help="run the planner in the simulator instead of replaying a dataset")
    group.add_argument("--world", default="robot", choices=["robot", "driving"],
                       help="robot: the SO-101 arm (default); driving: the synthetic road world (NAVSIM and "
                            "Bench2Drive scores, eval/drive_closed_loop.py)")
    group.add_argument("--task", default="pick_place", help="pick_place or reach_close (default: pick_place)")
    group.add_argument("--seeds", default=None,
                       help=f"seed range A:B, B excluded (default {DEFAULT_SEEDS}, or 1000000:1000020 with --world "
                            f"driving: held out; training data uses seeds below them)")
    group.add_argument("--episodes", type=positive_int, default=None, help="run only the first N seeds of --seeds")
    group.add_argument("--execute", type=positive_int, default=None,
                       help="chunk rows run before replanning (default: the whole chunk)")
    group.add_argument("--baselines", default=None,
                       help="comma-separated baselines run beside the model: expert, hold (driving: expert, cv), "
                            "or none (default: both)")
    group.add_argument("--max-steps", type=positive_int, default=None, help="episode step limit (default: the task's)")
    group.add_argument("--compare-bundle", default=None, metavar="SOURCE",
                       help="--world driving: a second build (bundle, quantize output or checkpoint; backend auto) "
                            "driven on the same seeds as policy 'compare', with paired PDMS / driving score "
                            "differences against the model")
    group.add_argument("--image-size", type=positive_int, default=128,
                       help="camera frame size in pixels (default 128, as the recorded demonstrations)")


def parse_baselines(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown or len(set(names)) != len(names):
        raise ClosedLoopUsageError(f"--baselines {text!r}: each must be one of {', '.join(BASELINES)} (once), "
                                   "or 'none'")
    return names


def _config(args: argparse.Namespace) -> Any:
    from ..sim.robot.so101 import TASKS, ExpertConfig
    from ..sim.robot.types import RobotDataError

    if args.task not in TASKS:
        raise ClosedLoopUsageError(f"--task {args.task!r}: not one of {', '.join(sorted(TASKS))}")
    cameras = parse_sim_cameras(args.cameras)
    try:
        return ExpertConfig(task=args.task, image_size=args.image_size, max_steps=args.max_steps, cameras=cameras)
    except RobotDataError as exc:
        raise ClosedLoopUsageError(f"--image-size {args.image_size}: {exc}") from None


def parse_sim_cameras(text: str | None) -> tuple[str, ...]:
    """``--cameras`` for the simulator: the cameras in prompt order (default front; ``all``: front, wrist)."""
    from ..sim.robot.so101 import CAMERAS, DEFAULT_CAMERAS

    if not text:
        return DEFAULT_CAMERAS
    if text.strip().lower() == "all":
        return CAMERAS
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or set(names) - set(CAMERAS) or len(set(names)) != len(names):
        raise ClosedLoopUsageError(f"--cameras {text!r}: with --closed-loop, each must be one of "
                                   f"{', '.join(CAMERAS)} (once), or 'all'")
    return names


def check_closed_loop_common(args: argparse.Namespace, default_seeds: str, baselines: Sequence[str]) -> range:
    """What both worlds refuse before any work (each error names its flag); the seeds to run."""
    if args.source or args.dataroot:
        raise ClosedLoopUsageError("--source/--dataroot replay a dataset; --closed-loop runs the simulator: "
                                   "drop them")
    if args.checkpoint and args.bundle:
        raise ClosedLoopUsageError("pass one of --checkpoint (torch) and --bundle (ONNX Runtime), not both")
    seeds = parse_seeds(args.seeds or default_seeds)
    if args.episodes is not None:
        seeds = seeds[:args.episodes]
    if not (args.checkpoint or args.bundle or baselines):
        raise ClosedLoopUsageError("--closed-loop needs --checkpoint or --bundle (or --baselines to run them alone)")
    if args.checkpoint:
        existing_dir("--checkpoint", args.checkpoint)
    if args.bundle:
        existing_dir("--bundle", args.bundle, holding="manifest.json")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is a file; give a directory")
    return seeds


def check_closed_loop_arguments(args: argparse.Namespace) -> tuple[Any, range, list[str]]:
    """Refuse before any work (each error names its flag); the env config, the seeds and the baselines."""
    baselines = parse_baselines(args.baselines or ",".join(BASELINES))
    seeds = check_closed_loop_common(args, DEFAULT_SEEDS, baselines)
    return _config(args), seeds, baselines


def closed_loop_planner_options(args: argparse.Namespace, restore_quantized: RestoreQuantized | None, *,
                                cameras: int, schema_of: Callable[[Any, str | None], Any]
                                ) -> tuple[Any, dict[str, Any]]:
    """What :func:`~blockpilot.runtime.sources.detect_source` found of ``--checkpoint``/``--bundle`` and the
    :func:`~blockpilot.runtime.sources.open_planner` options for a closed loop (either world); ``schema_of(checkpoint,
    --schema)`` resolves the schema of a checkpoint (a bundle decodes with its own)."""
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import detect_source

    flag = "--bundle" if args.bundle else "--checkpoint"
    found = detect_source(args.bundle or args.checkpoint, flag=flag,
                          kinds=("bundle",) if args.bundle else ("checkpoint", "quantized"))
    schema = None if args.bundle else schema_of(found.checkpoint or found.path, getattr(args, "schema", None))
    if args.threads and not args.bundle:
        import torch

        torch.set_num_threads(args.threads)
    settings = DecoderSettings(name=args.decoder, threshold=args.threshold, rollouts=args.rollouts)
    return found, dict(backend=args.backend, decoder=settings, device=args.device, dtype=args.dtype,
                       max_prompt_tokens=args.max_prompt_tokens, schema=schema, cameras=cameras,
                       threads=args.threads or 1, restore_quantized=restore_quantized, flag=flag,
                       trusted_keys=args.trusted_keys)


def open_closed_loop_planner(args: argparse.Namespace, restore_quantized: RestoreQuantized | None, *,
                             cameras: int, schema_of: Callable[[Any, str | None], Any]) -> tuple[Any, Any]:
    """The planner of ``--checkpoint``/``--bundle`` for a closed loop (:func:`closed_loop_planner_options`), and what
    :func:`~blockpilot.runtime.sources.detect_source` found."""
    from ..runtime.sources import open_planner

    found, options = closed_loop_planner_options(args, restore_quantized, cameras=cameras, schema_of=schema_of)
    return open_planner(found, **options), found


def ray_session(args: argparse.Namespace, restore_quantized: RestoreQuantized | None, *, cameras: int,
                schema_of: Callable[[Any, str | None], Any], errors: tuple[type[BaseException], ...]) -> Any:
    """With ``--ray``: a :class:`~.ray_cli.RaySession` of planner workers (baselines only without a model); else a
    null context (None)."""
    import contextlib

    if not getattr(args, "ray", None):
        return contextlib.nullcontext()
    from .ray_cli import RaySession

    found, options = (None, {}) if not (args.checkpoint or args.bundle) else closed_loop_planner_options(
        args, restore_quantized, cameras=cameras, schema_of=schema_of)
    return RaySession(args, found, options, errors)


def _robot_schema(checkpoint: Any, spec: str | None) -> Any:
    from ..vla.schema_io import resolve_schema

    return None if spec is None else resolve_schema(checkpoint, spec)


def run_closed_loop_command(args: argparse.Namespace, *, restore_quantized: RestoreQuantized | None = None) -> int:
    """``blockpilot eval --closed-loop``: 1 when the planner errored on every episode, else 0."""
    import json

    if args.world == "driving":
        from .drive_closed_loop_cli import run_drive_command

        return run_drive_command(args, restore_quantized=restore_quantized)
    if getattr(args, "compare_bundle", None):
        raise ClosedLoopUsageError("--compare-bundle applies to --world driving")

    from ..runtime.backend import BackendError
    from ..sim.robot.closed_loop import ExpertPolicy, HoldPolicy
    from .robot_closed_loop import (
        PlanAnswerError,
        PlannerPolicy,
        closed_loop_header,
        headline,
        progress_line,
        run_closed_loop,
    )

    config, seeds, baselines = check_closed_loop_arguments(args)
    errors = (BackendError, PlanAnswerError)
    with ray_session(args, restore_quantized, cameras=len(config.cameras), schema_of=_robot_schema,
                     errors=errors) as session:
        policies: list[Any] = []
        header = closed_loop_header(config, seeds, execute=args.execute, max_steps=args.max_steps)
        if args.checkpoint or args.bundle:
            planner = session.planner if session else open_closed_loop_planner(
                args, restore_quantized, cameras=len(config.cameras), schema_of=_robot_schema)[0]
            policies.append(PlannerPolicy(planner, args.execute))
            header = closed_loop_header(config, seeds, execute=args.execute, max_steps=args.max_steps,
                                        planner=planner, model=str(Path(args.bundle or args.checkpoint).resolve()),
                                        backend=args.backend)
        elif args.execute is not None:
            raise ClosedLoopUsageError("--execute applies to a planner: pass --checkpoint or --bundle")
        policies += [{"expert": ExpertPolicy, "hold": HoldPolicy}[name]() for name in baselines]
        if seeds.start < HELD_OUT_START:
            print(f"blockpilot eval: note: --seeds {args.seeds or DEFAULT_SEEDS} reaches below {HELD_OUT_START}, into "
                  "the seeds training data is recorded from; these episodes are not held out", file=sys.stderr)
        out = Path(args.out)
        mapper = session.robot_mapper([p.name for p in policies], config, args.execute) if session else None
        summary = run_closed_loop(policies, seeds, config, out, header=header, overwrite=args.overwrite,
                                  errors=errors, on_episode=None if args.no_progress or args.json else progress_line,
                                  map_episodes=mapper)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(headline(summary))
        print(f"results: {out / 'results.jsonl'}\nsummary: {out / 'summary.json'}\nreport:  {out / 'report.html'}")
    model = summary["policies"].get(policies[0].name) if isinstance(policies[0], PlannerPolicy) else None
    if model and model["errors"] == model["episodes"]:
        print(f"blockpilot eval: error: the planner errored on every episode; first: {model['first_error']}",
              file=sys.stderr)
        return 1
    return 0
