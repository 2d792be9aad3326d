"""``blockpilot quantize``: recipe -> target gate -> calibration -> modelopt -> saved model, with an
optional sensitivity report and the quality gate against the full-precision model (replay: ``--gate``; closed-loop
driving: ``--gate-closed-loop``; either or both, one verdict in ``gate/gate.json``)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from ..cli_common import (
    UserError,
    bounded,
    existing_dir,
    existing_path,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    writable_target,
)
from ..progress_bars import is_terminal

RECIPE_NAMES = ("fp8", "nvfp4", "w4a8", "int8_sq", "mixed", "auto")
# quant.targets.TARGETS and its ALIASES (the export target names), torch-free for --help; a test keeps them in step.
TARGET_NAMES = ("cpu", "orin", "thor", "h100", "rtx-ada", "rtx", "rtx-blackwell")
SOURCES = ("synthetic", "nuscenes", "wod", "mcap", "lerobot")  # lerobot: robot frames, an action-chunk model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="full-precision checkpoint dir")
    parser.add_argument("--recipe", required=True, choices=RECIPE_NAMES)
    parser.add_argument("--target", default="cpu", choices=TARGET_NAMES,
                        help="deployment target whose precisions the recipe must fit (default: cpu, fake quantization)")
    parser.add_argument("--allow-emulated", action="store_true",
                        help="accept formats the target runs only as fake quantization (accuracy studies)")
    knobs = parser.add_argument_group("recipe knobs")
    knobs.add_argument("--vision", default=None, help="vision tower format (fp8, nvfp4, int8_sq, none)")
    knobs.add_argument("--first-last-layers", default=None, help="format of the first and last decoder layer")
    knobs.add_argument("--kv-cache", default=None, choices=["fp8"], help="FP8 KV cache")
    knobs.add_argument("--effective-bits", type=positive_float, default=None,
                       help="auto: weight-bits budget (default 6.0)")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib", type=positive_int, default=64, help="calibration samples (default 64)")
    calib.add_argument("--calib-mode", default="teacher", choices=["teacher", "decode"],
                       help="teacher: one packed forward per sample over prompt plus ground-truth answer, causal "
                            "and masked-block attention (default); decode: a full planned decode per sample")
    calib.add_argument("--calib-source", default="synthetic", choices=SOURCES)
    calib.add_argument("--calib-dataroot", default=None,
                       help="dataset for --calib-source nuscenes/wod/mcap, or a LeRobot dataset for lerobot (the "
                            "source an action-chunk model must calibrate on)")
    calib.add_argument("--calib-scenes", type=positive_int, default=8, help="generated scenes for synthetic")
    calib.add_argument("--cache-dir", default=None, help="calibration cache (default ~/.cache/blockpilot)")
    parser.add_argument("--sensitivity", action="store_true", help="write a per-group sensitivity report")
    parser.add_argument("--keep-sensitive", type=non_negative_int, default=0,
                        help="with --sensitivity: the K most sensitive groups go to fp8 (auto: out of the search)")
    gate = parser.add_argument_group("quality gate")
    gate.add_argument("--gate", action="store_true", help="replay fp32 and quantized; fail on a quality drop")
    gate.add_argument("--gate-bound", type=non_negative_float, default=0.05,
                      help="allowed relative L2@3s growth (default 0.05)")
    gate.add_argument("--gate-parse-drop", type=fraction, default=0.0,
                      help="allowed parse-rate drop, 0 to 1 (default 0)")
    gate.add_argument("--gate-action-l1", type=non_negative_float, default=0.05,
                      help="action-chunk model: allowed mean |quantized - fp32| action difference (default 0.05)")
    gate.add_argument("--gate-source", default="synthetic", choices=SOURCES)
    gate.add_argument("--gate-dataroot", default=None, help="dataset for --gate-source nuscenes/wod/mcap")
    gate.add_argument("--gate-scenes", type=positive_int, default=4, help="held-out generated scenes for synthetic")
    gate.add_argument("--gate-limit", type=positive_int, default=None, help="replay only the first N samples")
    add_closed_loop_gate_arguments(gate)
    parser.add_argument("--decoder", default="scaffold", choices=["ar", "block", "scaffold"])
    parser.add_argument("--out", default=None, help="output dir (default runs/quant/<recipe>)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars for calibration and the gate (they draw only on a terminal)")
    from ..vla.schema_io import add_schema_option

    add_schema_option(parser)


def add_closed_loop_gate_arguments(group: Any) -> None:
    """``--gate-closed-loop``, ``--gate-pdms-bound``, ``--gate-max-steps`` (``quantize`` and ``export``)."""
    group.add_argument("--gate-closed-loop", type=positive_int, default=None, metavar="EPISODES",
                       help="drive EPISODES held-out seeds of the synthetic driving world with the fp32 model and "
                            "the build (quantized model, bundle); fail when the build's mean PDMS is more than "
                            "--gate-pdms-bound below fp32's")
    group.add_argument("--gate-pdms-bound", type=bounded(float, 0.0, 1.0), default=0.05, metavar="B",
                       help="allowed drop of the closed-loop mean PDMS (0..1, default 0.05)")
    group.add_argument("--gate-max-steps", type=positive_int, default=None, metavar="N",
                       help="closed-loop world steps (0.1 s) per episode after the warm-up (default: the whole "
                            "episode)")


def check_closed_loop_gate(args: argparse.Namespace) -> None:
    """The closed-loop gate flags, refused before any work, naming the flag."""
    if args.gate_closed_loop is None:
        for flag, value, default in (("--gate-pdms-bound", args.gate_pdms_bound, 0.05),
                                     ("--gate-max-steps", args.gate_max_steps, None)):
            if value != default:
                raise UserError(f"{flag} goes with --gate-closed-loop EPISODES")
        return
    from ..eval.drive_closed_loop_cli import drive_config

    drive_config(args.gate_max_steps, flag="--gate-max-steps")


def _knobs(args: argparse.Namespace) -> dict[str, Any]:
    given = {"vision": args.vision, "first_last_layers": args.first_last_layers, "kv_cache": args.kv_cache,
             "effective_bits": args.effective_bits}
    return {k: v for k, v in given.items() if v is not None}


def _source(kind: str, dataroot: str | None, scenes: int, what: str, schema: Any,
            heldout_dir: Path | None = None) -> Any:
    """The ``--{what}-source`` samples for a model answering in ``schema``: robot frames for an action-chunk schema,
    driving scenes for a driving one; the other pairing is a :class:`UserError` naming the flag."""
    from ..eval.replay import EvalUsageError, open_source
    from ..vla.plans import ActionChunkSchema

    robot = isinstance(schema, ActionChunkSchema)
    if robot != (kind == "lerobot"):
        raise UserError(f"--{what}-source {kind}: " + (
            f"this model answers in action chunks ({', '.join(schema.dims)}) and is calibrated and gated on robot "
            f"observations: pass --{what}-source lerobot --{what}-dataroot DATASET (a LeRobot dataset)" if robot else
            f"this model plans driving ({type(schema).__name__}); robot frames go with an action-chunk schema"))
    if robot:
        from ..calibration.robot import LeRobotCalibrationSource

        if not dataroot:
            raise UserError(f"--{what}-source lerobot needs --{what}-dataroot")
        return LeRobotCalibrationSource(dataroot, schema, flag=f"--{what}-dataroot")
    if kind != "synthetic":
        if not dataroot:
            raise EvalUsageError(f"--{what}-source {kind} needs --{what}-dataroot")
        return open_source(kind, dataroot)
    if heldout_dir is None:
        from ..calibration import synthetic_calibration_source

        return synthetic_calibration_source(scenes)
    from ..eval.nuscenes import NuScenesSource
    from ..eval.synthetic import HELDOUT_SEED_BASE
    from ..sim.generator import generate_scene
    from ..sim.writers.nuscenes import write_nuscenes

    if not (heldout_dir / "v1.0-synthetic").is_dir():
        if heldout_dir.exists():
            shutil.rmtree(heldout_dir)
        write_nuscenes([generate_scene(HELDOUT_SEED_BASE + i) for i in range(scenes)], heldout_dir)
    return NuScenesSource(heldout_dir)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse before any work (calibration and the gate take minutes): paths and pairings, named by their flags."""
    existing_dir("--checkpoint", args.checkpoint, holding="config.json")
    for what in ("calib", "gate"):
        source, dataroot = getattr(args, f"{what}_source"), getattr(args, f"{what}_dataroot")
        if what == "gate" and not args.gate:
            continue
        if source != "synthetic" and not dataroot:
            raise UserError(f"--{what}-source {source} needs --{what}-dataroot")
        if dataroot:
            existing_path(f"--{what}-dataroot", dataroot)
    writable_target("--out", args.out or f"runs/quant/{args.recipe}", directory=True)
    if args.cache_dir:
        writable_target("--cache-dir", args.cache_dir, directory=True)
    if args.keep_sensitive and not args.sensitivity:
        raise UserError("--keep-sensitive goes with --sensitivity")
    check_closed_loop_gate(args)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from ..runtime.plan_types import DecoderSettings
    from ..vla.plans import ActionChunkSchema
    from .pipeline import QUANTIZED_DIR, load_planner, quantize_checkpoint
    from .recipes import resolve_recipe
    from .targets import check_recipe, resolve_target

    checkpoint = Path(args.checkpoint)
    out = Path(args.out or f"runs/quant/{args.recipe}")
    recipe = resolve_recipe(args.recipe, **_knobs(args))
    target = resolve_target(args.target)
    check_recipe(recipe, target, allow_emulated=args.allow_emulated)  # refuse before any work
    decoder = DecoderSettings(name=args.decoder)
    schema = _schema(checkpoint, args.schema)
    cache = Path(args.cache_dir) if args.cache_dir else None
    # bars on stderr while calibration and the gate replay run (a terminal only; stdout keeps its lines)
    progress = not (args.quiet or getattr(args, "json", False)) and is_terminal()
    calib_source = _source(args.calib_source, args.calib_dataroot, args.calib_scenes, "calib", schema)
    if args.gate_closed_loop and isinstance(schema, ActionChunkSchema):
        raise UserError("--gate-closed-loop drives the synthetic driving world: it gates a driving model, and this "
                        "one answers in action chunks")
    gate_source = None  # robot frames, opened (or refused, naming --gate-source) before calibration runs
    if args.gate and (args.gate_source == "lerobot" or isinstance(schema, ActionChunkSchema)):
        gate_source = _source(args.gate_source, args.gate_dataroot, args.gate_scenes, "gate", schema)
    if args.sensitivity:
        recipe = _sensitivity(args, checkpoint, decoder, recipe, calib_source, cache, out, schema)
    outcome = quantize_checkpoint(checkpoint, recipe, calib_source, args.calib, out, target=target,
                                  allow_emulated=args.allow_emulated, decoder=decoder, cache_dir=cache,
                                  schema=schema, calib_mode=args.calib_mode, progress=progress)
    report = outcome.report.to_dict()
    print(f"recipe        {recipe.name}: {recipe.description}")
    for note in outcome.notes:
        print(f"target        {target.name} ({target.sm}): {note}")
    print(f"calibration   {outcome.calibration.get('selected')} samples "
          f"({'cache' if outcome.calibration.get('from_cache') else 'built'}), hash "
          f"{str(outcome.calibration.get('content_hash'))[:12]}, {outcome.calibration.get('mode')} mode"
          + _loop_summary(outcome.calibration.get("loop")))
    print(f"quantized     {report['quantized_modules']} modules, formats {json.dumps(report['formats'])}"
          + (f"; {report['emulation']}" if report.get("emulation") else ""))
    if outcome.auto is not None:
        print(f"auto search   {outcome.auto['effective_bits']:.3f} effective bits (budget {outcome.auto['budget']})")
    print(f"saved         {out / QUANTIZED_DIR} (modelopt_state.pth, quantized_weights.pth, precision_map.json)")
    if not (args.gate or args.gate_closed_loop):
        return 0
    from .gate import CLOSED_LOOP_DIR, finish_gate, run_closed_loop_gate, run_gate, run_robot_gate, with_closed_loop

    gate_dir = out / "gate"

    def make() -> Any:
        return _source(args.gate_source, args.gate_dataroot, args.gate_scenes, "gate", schema, gate_dir / "heldout")

    fp32 = load_planner(checkpoint, decoder, schema=schema)
    result, lines = None, []
    if args.gate and gate_source is not None:
        result = run_robot_gate(fp32, outcome.planner, gate_source, gate_dir, precision=recipe.name,
                                l1_bound=args.gate_action_l1, parse_drop=args.gate_parse_drop, limit=args.gate_limit)
        l1 = "n/a" if result.action_l1_vs_fp32 is None else f"{result.action_l1_vs_fp32:.4f}"
        lines.append(f"action L1 vs fp32 {l1} on {result.samples} samples, bound {args.gate_action_l1:g}")
    elif args.gate:
        result = run_gate(fp32, outcome.planner, make, gate_dir, checkpoint=checkpoint, precision=recipe.name,
                          l2_bound=args.gate_bound, parse_drop=args.gate_parse_drop, limit=args.gate_limit,
                          progress=progress)
        lines.append(f"L2@3s {_metres(result.l2_3s_fp32)} -> {_metres(result.l2_3s_quant)} m on {result.samples} "
                     f"samples, bound {args.gate_bound:.0%}")
    if args.gate_closed_loop:
        from ..eval.drive_closed_loop_cli import drive_config

        config = drive_config(args.gate_max_steps, flag="--gate-max-steps")
        paired = run_closed_loop_gate(fp32, outcome.planner, gate_dir / CLOSED_LOOP_DIR,
                                      episodes=args.gate_closed_loop, config=config, candidate=recipe.name,
                                      progress=progress)
        result = with_closed_loop(result, paired, pdms_bound=args.gate_pdms_bound, run_dir=gate_dir / CLOSED_LOOP_DIR)
        lines.append(closed_loop_line(paired, args.gate_pdms_bound))
    assert result is not None
    return finish_gate(result, gate_dir, "; ".join(lines) + "; CPU latencies of fake-quantized models are not "
                                                            "deployment latencies")


def closed_loop_line(paired: dict[str, Any], bound: float) -> str:
    p = paired["pdms"]
    if p["mean_diff"] is None:
        return "closed loop: no paired episode"
    return (f"closed-loop PDMS {p['reference_mean']:.3f} -> {p['candidate_mean']:.3f} on {paired['episodes']} "
            f"episodes, allowed drop {bound:g}")


def _metres(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _schema(checkpoint: Path, spec: str | None) -> Any:
    """The answer schema the model is quantized for: ``--schema``, else the checkpoint's own."""
    from ..vla.config import ConfigError
    from ..vla.plans import ActionChunkSchema, DrivingSchema
    from ..vla.schema_io import resolve_schema

    try:
        schema = resolve_schema(checkpoint, spec)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    if not isinstance(schema, (DrivingSchema, ActionChunkSchema)):
        raise UserError(f"--schema {spec}: quantize takes a driving or an action-chunk model (e.g. so101-ee), got "
                        f"{type(schema).__name__}")
    return schema


def _loop_summary(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    if stats.get("mode") == "teacher":
        sources = stats.get("answer_sources", {})
        return (f": {stats['forwards']} packed forwards in {stats['seconds']:.1f} s, answers "
                + ", ".join(f"{n} {k}" for k, n in sources.items() if n))
    return f": {stats['forwards']} forwards in {stats['seconds']:.1f} s"


def _sensitivity(args: argparse.Namespace, checkpoint: Path, decoder: Any, recipe: Any, calib_source: Any,
                 cache: Path | None, out: Path, schema: Any = None) -> Any:
    from ..calibration import build_calibration_set
    from .pipeline import load_planner
    from .recipes import FORMATS, NONE
    from .sensitivity import demote_sensitive, sensitivity_report

    formats = [f for f in (recipe.auto.formats if recipe.auto else recipe.formats_used) if f != NONE]
    narrowest = min(formats, key=lambda f: FORMATS[f].effective_bits)
    calib = build_calibration_set(calib_source, args.calib, cache_dir=cache)
    report = sensitivity_report(lambda: load_planner(checkpoint, decoder, schema=schema), calib, narrowest)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "sensitivity.json", report.to_json())
    atomic_write(out / "sensitivity.md", report.to_markdown())
    print(report.to_markdown())
    return demote_sensitive(recipe, report, args.keep_sensitive)
