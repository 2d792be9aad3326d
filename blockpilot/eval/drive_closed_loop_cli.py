"""``blockpilot eval --closed-loop --world driving``: the planner drives the car in the synthetic world.

It is a world of ``eval --closed-loop`` rather than its own command because it takes the same options with the same
meaning: the model (``--checkpoint``/``--bundle``, ``--backend``, ``--decoder``, ``--schema``, ``--dtype``), the
episodes (``--seeds``, ``--episodes``, ``--baselines``, ``--max-steps``: here world steps of 0.1 s after the 2 s
warm-up) and the run directory (``--out``, ``--overwrite``, ``--json``); only the default seeds and the baselines
(``expert``, ``cv``) are the driving world's. Results resume as the replay's (:mod:`.drive_closed_loop`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli_common import existing_dir
from ..sim.drive.episode import DriveConfig
from .drive_closed_loop import BASELINES
from .replay import driving_schema
from .robot_closed_loop import ClosedLoopUsageError
from .robot_closed_loop_cli import check_closed_loop_common, open_closed_loop_planner, ray_session
from .synthetic import HELDOUT_SEED_BASE

if TYPE_CHECKING:
    from ..runtime.sources import RestoreQuantized

DEFAULT_SEEDS = f"{HELDOUT_SEED_BASE}:{HELDOUT_SEED_BASE + 20}"
SCENE_DT = 0.1  # generate_scene's step


def parse_drive_baselines(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or ",".join(BASELINES)).split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown or len(set(names)) != len(names):
        raise ClosedLoopUsageError(f"--baselines {text!r}: with --world driving each must be one of "
                                   f"{', '.join(BASELINES)} (once), or 'none'")
    return names


def drive_config(max_steps: int | None, *, flag: str = "--max-steps") -> DriveConfig:
    """The episode settings; ``max_steps`` (``flag``): world steps (0.1 s) the policy drives, at most the scene's
    rest."""
    config = DriveConfig()
    if max_steps is None:
        return config
    most = round((config.end_s - config.start_s) / SCENE_DT)
    if max_steps > most:
        raise ClosedLoopUsageError(f"{flag} {max_steps}: a driving episode has at most {most} steps of "
                                   f"{SCENE_DT} s after the {config.start_s} s warm-up")
    return replace(config, end_s=config.start_s + max_steps * SCENE_DT)


def check_drive_arguments(args: argparse.Namespace) -> tuple[range, list[str], DriveConfig]:
    """Refuse before any work, naming the flag; the seeds, the baselines and the episode settings."""
    if args.execute is not None:
        raise ClosedLoopUsageError("--execute applies to --world robot (a driving plan is tracked until the next)")
    if args.cameras:
        raise ClosedLoopUsageError(f"--cameras {args.cameras}: the driving world renders the front camera only")
    config = drive_config(args.max_steps)
    baselines = parse_drive_baselines(args.baselines)
    seeds = check_closed_loop_common(args, DEFAULT_SEEDS, baselines)
    if args.compare_bundle:
        if not (args.checkpoint or args.bundle):
            raise ClosedLoopUsageError("--compare-bundle compares against the model: pass --checkpoint or --bundle")
        if getattr(args, "ray", None) is not None:
            raise ClosedLoopUsageError("--compare-bundle runs in this process: drop --ray (a Ray worker opens one "
                                       "planner)")
        existing_dir("--compare-bundle", args.compare_bundle)
    return seeds, baselines, config


def open_compare_planner(args: argparse.Namespace, restore_quantized: RestoreQuantized | None) -> tuple[Any, str]:
    """The ``--compare-bundle`` planner (bundle, quantize output or checkpoint, on its default backend) with the
    decoder settings of the model, and its backend's name."""
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import detect_source, open_planner

    found = detect_source(args.compare_bundle, flag="--compare-bundle")
    schema = None if found.kind == "bundle" else driving_schema(found.checkpoint or found.path,
                                                                getattr(args, "schema", None))
    settings = DecoderSettings(name=args.decoder, threshold=args.threshold, rollouts=args.rollouts)
    planner = open_planner(found, decoder=settings, schema=schema, cameras=1, threads=args.threads or 1,
                           max_prompt_tokens=args.max_prompt_tokens,
                           restore_quantized=restore_quantized, flag="--compare-bundle",
                           trusted_keys=args.trusted_keys)
    return planner, found.default_backend


def run_drive_command(args: argparse.Namespace, *, restore_quantized: RestoreQuantized | None = None) -> int:
    """1 when the planner failed every episode, else 0."""
    from ..runtime.backend import BackendError
    from ..runtime.sources import detect_source
    from .drive_closed_loop import drive_header, headline, progress_line, run_drive
    from .drive_compare import paired_text
    from .drive_policy import PlannerDrivePolicy

    seeds, baselines, config = check_drive_arguments(args)
    with ray_session(args, restore_quantized, cameras=1, schema_of=driving_schema, errors=(BackendError,)) as session:
        policies: list[tuple[str, Any]] = []
        header = drive_header(config, seeds)
        if args.checkpoint or args.bundle:
            if session:
                planner, found = session.planner, detect_source(args.bundle or args.checkpoint)
            else:
                planner, found = open_closed_loop_planner(args, restore_quantized, cameras=1,
                                                          schema_of=driving_schema)
            policies.append(("model", lambda world: PlannerDrivePolicy(planner, name="model")))
            backend = found.default_backend if args.backend == "auto" else args.backend
            header = drive_header(config, seeds, model=str(Path(args.bundle or args.checkpoint).resolve()),
                                  backend=backend, decoder=planner.settings.to_dict(),
                                  dtype=getattr(planner.backend, "dtype", None))
        pair = None
        if args.compare_bundle:
            other, other_backend = open_compare_planner(args, restore_quantized)
            policies.append(("compare", lambda world: PlannerDrivePolicy(other, name="compare")))
            header["compare"] = {"model": str(Path(args.compare_bundle).resolve()), "backend": other_backend,
                                 "dtype": getattr(other.backend, "dtype", None)}
            pair = ("model", "compare")
        policies += [(name, BASELINES[name]) for name in baselines]
        if seeds.start < HELDOUT_SEED_BASE:
            print(f"blockpilot eval: note: --seeds {args.seeds} reaches below {HELDOUT_SEED_BASE}: those scenes are "
                  "training scenes, not held out", file=sys.stderr)
        out = Path(args.out)
        summary = run_drive(policies, seeds, config, out, header=header, overwrite=args.overwrite,
                            errors=(BackendError,), on_episode=None if args.no_progress or args.json else progress_line,
                            map_episodes=session.drive_mapper(config) if session else None, pair=pair)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(headline(summary))
        if pair:
            print(paired_text(summary["paired"]))
        print(f"results: {out / 'results.jsonl'}\nsummary: {out / 'summary.json'}")
    model = summary["policies"].get("model")
    if model and model["failed"] == model["episodes"]:
        print(f"blockpilot eval: error: the planner failed every episode; first: {model['first_error']}",
              file=sys.stderr)
        return 1
    return 0
