"""``blockpilot jetson``: platform info, on-device engine builds, power modes and device benchmarks.

Argument definitions import nothing heavy, so ``blockpilot --help`` stays fast; each action imports its work.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from ..cli_common import (
    JSON_HELP,
    about,
    add_json_option,
    emit,
    existing_dir,
    existing_path,
    non_negative_int,
    positive_int,
    writable_target,
)
from ..errors import BlockpilotError
from ..export.targets import ATTENTION_ROUTES
from ..runtime.backend import BUNDLE_BACKENDS
from ..runtime.plan_types import DECODERS
from .power import STATE_FILE, PowerControl

ATTENTION_HELP = ("LM-step attention route: auto takes the plugin only where torch and Triton import on this device, "
                  "else decomposed (TensorRT 10.3 fuses it); native needs TensorRT 10.14+")
NOT_A_JETSON = ("not a Jetson (no NVIDIA Tegra device tree under {root}); on a workstation build TensorRT-RTX "
                "engines ahead of time with `blockpilot export --target rtx`")


class JetsonUsageError(BlockpilotError, ValueError):
    """A ``blockpilot jetson`` action that cannot run here (for example a device build off-Jetson)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="jetson_command", metavar="ACTION", required=True)
    root_help = "filesystem root holding etc/nv_tegra_release and proc/device-tree (default /; another root " \
                "skips the dpkg query)"

    info = sub.add_parser("info", help="platform, L4T / JetPack / TensorRT / CUDA versions, the engine profile and "
                                       "the recommended export command")
    info.add_argument("--root", default="/", help=root_help)
    info.add_argument("--checkpoint", default="CHECKPOINT_DIR", help="checkpoint shown in the export command")
    info.add_argument("--out", default="BUNDLE_DIR", help="bundle shown in the export command")
    info.add_argument("--json", action="store_true", help=JSON_HELP)

    build = sub.add_parser("build", help="build this Jetson's engines on the device (blockpilot export with the "
                                         "platform's target, recipe and attention route)")
    build.add_argument("--checkpoint", required=True, help="checkpoint dir (config.json, safetensors, tokenizer.json)")
    build.add_argument("--out", required=True, help="bundle directory to create")
    build.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    build.add_argument("--with-weights", action="store_true", help="also copy the safetensors (torch backend)")
    build.add_argument("--calib", type=positive_int, default=32,
                       help="calibration samples for a quantized recipe (Thor fp8)")
    build.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                       help="prompt budget the KV cache is sized for (default: the checkpoint's image policy for "
                            "--cameras frames)")
    build.add_argument("--cameras", type=positive_int, default=1,
                       help="camera frames per prompt the bundle is sized for")
    build.add_argument("--timing-cache", default=None,
                       help="TensorRT timing cache (default ~/.cache/blockpilot/tensorrt-timing.cache; '' for none)")
    build.add_argument("--attention", default="auto", choices=["auto", *ATTENTION_ROUTES],
                       help=ATTENTION_HELP)
    build.add_argument("--root", default="/", help=root_help)
    build.add_argument("--quiet", action="store_true", help="no progress bars")

    doctor = sub.add_parser("doctor", help="L4T / JetPack, CUDA, TensorRT, cuDNN, rclpy, torch, Triton and "
                                           "cuda-python found against what a bundle (or an on-device build) needs, "
                                           "with the install command for each gap; exit 1 when it cannot run here")
    doctor.add_argument("--bundle", default=None, help="bundle directory whose engines and attention route to check "
                                                       "(default: what `jetson build` would build here)")
    doctor.add_argument("--attention", default="auto", choices=["auto", *ATTENTION_ROUTES],
                        help="route to check: auto is the bundle's (native, decomposed, then plugin, as the runtime "
                             "picks) or, without --bundle, the one `jetson build` takes here")
    doctor.add_argument("--dpkg-listing", default=None, metavar="FILE",
                        help="read `dpkg-query -W` output from FILE (one recorded on the car) instead of running "
                             "dpkg-query")
    doctor.add_argument("--root", default="/", help=root_help)
    doctor.add_argument("--json", action="store_true", help=JSON_HELP)

    power = sub.add_parser("power", help="show the power mode; set one (--mode, saving the current mode and clocks) "
                                         "or put the saved one back (--restore); needs root")
    action = power.add_mutually_exclusive_group()
    action.add_argument("--mode", default=None, help="nvpmodel mode id or name from /etc/nvpmodel.conf (MAXN, ...)")
    action.add_argument("--restore", action="store_true", help="restore the mode and clocks saved by --mode")
    power.add_argument("--max-clocks", action="store_true", help="with --mode: also pin clocks (jetson_clocks)")
    power.add_argument("--state", default=str(STATE_FILE), help=f"saved power state (default {STATE_FILE})")

    bench = sub.add_parser("bench", help="latency p50/p90/p99 per stage over held-out generated observations, with "
                                         "tegrastats power and temperature")
    model = bench.add_mutually_exclusive_group(required=True)
    model.add_argument("--bundle", help="bundle directory (TensorRT on a Jetson, ONNX Runtime elsewhere)")
    model.add_argument("--checkpoint", help="checkpoint directory (torch backend)")
    bench.add_argument("--backend", default="auto", choices=["auto", *BUNDLE_BACKENDS],
                       help="backend for --bundle (auto: tensorrt on a Jetson, onnxruntime elsewhere)")
    bench.add_argument("--device", default="cpu", help="torch device for --checkpoint (cpu, cuda)")
    from ..vla.dtypes import add_dtype_option

    add_dtype_option(bench)
    bench.add_argument("--threads", type=positive_int, default=1, help="CPU threads of the ONNX Runtime backend")
    bench.add_argument("--decoder", default="scaffold", choices=DECODERS, help="decoder (default: scaffold)")
    bench.add_argument("--samples", type=positive_int, default=20, help="timed plans, one held-out observation each")
    bench.add_argument("--warmup", type=non_negative_int, default=2, help="untimed plans first (CUDA graphs, caches)")
    bench.add_argument("--tegrastats", action="store_true", help="record tegrastats over the timed window")
    bench.add_argument("--interval-ms", type=positive_int, default=100, help="tegrastats sampling interval")
    add_json_option(bench, file_help="also write the result as JSON here (was --json PATH)")
    bench.add_argument("--root", default="/", help=root_help)


def power_control() -> PowerControl:
    """The power controller the CLI uses (a seam for tests)."""
    return PowerControl()


def _detect(root: str) -> Any:
    """The platform under ``root``; the dpkg query describes this machine, so it runs only for ``/``."""
    from .commands import run_command
    from .platform import detect_platform

    return detect_platform(root, runner=run_command if Path(root).resolve() == Path("/") else None)


def _info(args: argparse.Namespace) -> int:
    from ..export.targets import plugin_runtime_available
    from .profiles import engine_profile, recommended_export_args

    platform = _detect(args.root)
    if platform is None:
        message = NOT_A_JETSON.format(root=args.root)
        print(json.dumps({"jetson": False, "reason": message}, indent=2) if args.json else message)
        return 0
    installed = plugin_runtime_available(import_them=False)  # info stays light: nothing imported
    profile = engine_profile(platform, plugin_runtime=installed)
    command = recommended_export_args(platform, args.checkpoint, args.out, plugin_runtime=installed)
    if args.json:
        print(json.dumps({"jetson": True, "platform": platform.to_dict(), "profile": profile.to_dict(),
                          "export_command": command}, indent=2))
        return 0
    print(platform.describe())
    print(f"profile   target {profile.target}, recipe {profile.recipe or 'none'}, {profile.engine_precision} engines, "
          f"attention {profile.attention}")
    for note in profile.notes:
        print(f"note      {note}")
    print(f"export    {shlex.join(command)}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from ..export.bundle_export import export_bundle
    from ..export.progress import StageProgress
    from .profiles import check_gate, default_timing_cache, engine_profile

    platform = _detect(args.root)
    if platform is None:
        raise JetsonUsageError("jetson build runs on the Jetson itself (TensorRT builds for the GPU it runs on); "
                               + NOT_A_JETSON.format(root=args.root))
    existing_dir("--checkpoint", args.checkpoint, holding="config.json")
    writable_target("--out", args.out, overwrite=args.overwrite, directory=True)
    profile = engine_profile(platform, attention=args.attention)
    check_gate(profile)
    cache = default_timing_cache() if args.timing_cache is None else args.timing_cache
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    print(f"building {profile.target} engines on {platform.module} (TensorRT {platform.tensorrt or 'unknown'}): "
          f"recipe {profile.recipe or 'none'}, {profile.engine_precision}, attention {profile.attention}")
    summary = export_bundle(Path(args.checkpoint), Path(args.out), max_prompt_tokens=args.max_prompt_tokens,
                            cameras=args.cameras, with_weights=args.with_weights, overwrite=args.overwrite,
                            targets=(profile.target,),
                            engine_precision="fp16" if profile.recipe else profile.engine_precision,
                            recipe=profile.recipe, calib=args.calib, attention=profile.attention,
                            progress=StageProgress(enabled=False if args.quiet else None),
                            timing_cache=Path(cache) if cache else None)
    print(summary.table())
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from ..formats.bundle import load_bundle
    from . import stack
    from .commands import run_command
    from .doctor import diagnose
    from .platform import detect_platform

    bundle = None
    if args.bundle is not None:
        existing_dir("--bundle", args.bundle, holding="manifest.json")
        with about("--bundle"):
            bundle = load_bundle(args.bundle, verify=False)  # sizes and manifest; `blockpilot verify` hashes
    if args.dpkg_listing is not None:
        with about("--dpkg-listing"):
            dpkg = stack.read_listing(existing_path("--dpkg-listing", args.dpkg_listing))
    elif Path(args.root).resolve() == Path("/"):
        dpkg = stack.query_dpkg(run_command)
    else:
        dpkg = {}
    platform = detect_platform(args.root, runner=None, packages=dpkg)
    report = diagnose(platform, dpkg, stack.python_versions(), bundle=bundle, attention=args.attention,
                      root=args.root)
    emit(args, report.to_dict(), report.table())
    return 0 if report.ok else 1


def _power(args: argparse.Namespace) -> int:
    from .power import restore_state, save_state

    control = power_control()
    if args.restore:
        mode = restore_state(control, args.state)
        print(f"restored power mode {mode.id} ({mode.name}) and the saved clocks")
        return 0
    if args.mode is None:
        if args.max_clocks:
            raise JetsonUsageError("--max-clocks goes with --mode")
        current = control.query()
        modes = control.modes()
        print(f"power mode {current.id} ({current.name})")
        if modes:
            print("modes      " + ", ".join(f"{i} {n}" for i, n in sorted(modes.items())))
        return 0
    target = control.resolve(args.mode)
    state = save_state(control, args.state)
    control.set_mode(target)
    if args.max_clocks:
        control.max_clocks()
    print(f"power mode {target} set (was {state['mode']} {state['name']}; saved to {args.state})"
          + ("; clocks pinned" if args.max_clocks else ""))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import open_planner
    from .bench import heldout_observations, run_jetson_bench
    from .tegrastats import TegrastatsRecorder

    if args.bundle:
        existing_dir("--bundle", args.bundle, holding="manifest.json")
    else:
        existing_dir("--checkpoint", args.checkpoint, holding="config.json")
    if args.json_out:
        writable_target("--json-out", args.json_out)
    platform = _detect(args.root)
    settings = DecoderSettings(name=args.decoder)
    if args.bundle:
        backend = args.backend if args.backend != "auto" else ("tensorrt" if platform is not None else "onnxruntime")
        planner = open_planner(args.bundle, backend=backend, decoder=settings, threads=args.threads, kinds=("bundle",),
                               flag="--bundle")
        describe = {"model": args.bundle, "backend": backend, "decoder": args.decoder}
    else:
        planner = open_planner(args.checkpoint, decoder=settings, device=args.device, dtype=args.dtype,
                               kinds=("checkpoint",), flag="--checkpoint")
        describe = {"model": args.checkpoint, "backend": f"torch ({args.device})", "decoder": args.decoder,
                    "dtype": getattr(planner.backend, "dtype", args.dtype)}
    recorder, note = None, "not requested (--tegrastats)"
    if args.tegrastats:
        if platform is None:
            note = "absent: not a Jetson, latency only"
        elif not TegrastatsRecorder.available():
            note = "absent: no tegrastats on PATH, latency only"
        else:
            recorder = TegrastatsRecorder(args.interval_ms)
    result = run_jetson_bench(planner, heldout_observations(args.samples), warmup=args.warmup, recorder=recorder,
                       recorder_note=note, describe=describe, platform=platform.to_dict() if platform else None)
    emit(args, result.to_dict(), result.table())
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"info": _info, "build": _build, "doctor": _doctor, "power": _power, "bench": _bench}
    return actions[args.jetson_command](args)
