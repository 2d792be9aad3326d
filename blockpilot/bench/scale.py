"""``blockpilot bench scale``: every stage of a deployment on a random-weight checkpoint of a published shape,
each in a fresh subprocess with a time limit, recording wall time, exit code and peak RSS (the child's
``ru_maxrss`` from ``wait4``: the largest resident set of the stage's process tree it waited for).

The report (JSON and a table, rewritten after every stage) holds the machine, the versions, the weight bytes
and each stage's peak RSS as a multiple of them. A stage that fails or times out is recorded with its exit code
and the tail of its output, and the run goes on; a stage whose input an earlier stage failed to make is
recorded as skipped with that reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .scale_probe import RESULT_PREFIX
from .scale_shapes import SCALE_SHAPES, ScaleShape
from .shapes import BenchError

ERROR_TAIL = 1500
EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'


class ScaleBenchError(BenchError):
    """A bad ``bench scale`` invocation (unknown shape or stage, a bad number)."""


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()  # stages whose output this one reads
    what: str = ""


@dataclass
class StageResult:
    name: str
    what: str
    status: str  # passed | failed | timeout | skipped
    command: str
    rc: int | None = None
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    rss_x_weights: float | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScaleOptions:
    shape: str
    work: Path
    results: Path
    timeout_s: float = 3600.0
    stages: tuple[str, ...] | None = None
    plan_steps: int = 8
    calib: int = 4
    force_external_data: bool = False
    keep: bool = False
    dtype: str = "auto"  # of the torch load and plan stages (auto: the checkpoint's, bf16)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockpilot.cli", *args]


def _probe(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockpilot.bench.scale_probe", *args]


def loopback_prefix() -> list[str] | None:
    """``unshare -n`` (``-rn`` unprivileged) bringing ``lo`` up, so DDS stays inside; None where unavailable."""
    unshare = shutil.which("unshare")
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if unshare is None or ip is None:
        return None
    flags = ["-n"] if os.geteuid() == 0 else ["-r", "-n"]
    return [unshare, *flags, "--", "/bin/sh", "-c", '"$0" link set lo up && exec "$@"', ip]


def stages_for(shape: ScaleShape, opts: ScaleOptions) -> list[Stage]:
    w = opts.work
    ckpt, bundle, nus = str(w / "checkpoint"), str(w / "bundle"), str(w / "nuscenes")
    calib = str(opts.calib)
    out = [
        Stage("write", _probe("write", shape.name, ckpt, "--dataroot", nus), what="random bf16 checkpoint"),
        Stage("load", _probe("load", ckpt, "--dtype", opts.dtype), ("write",), "load (torch)"),
        Stage("plan-torch", _probe("plan", ckpt, "--backend", "torch", "--steps", str(opts.plan_steps), "--dtype",
                                   opts.dtype), ("write",), f"plan, torch, {opts.plan_steps} block steps"),
        Stage("quantize-fp8", _cli("quantize", "--checkpoint", ckpt, "--recipe", "fp8", "--calib", calib,
                                   "--out", str(w / "quant-fp8")), ("write",), f"quantize fp8, {calib} calib"),
    ]
    if shape.name == "1.5b":
        out.append(Stage("quantize-nvfp4", _cli("quantize", "--checkpoint", ckpt, "--recipe", "nvfp4",
                                                "--allow-emulated", "--calib", calib, "--out", str(w / "quant-nvfp4")),
                         ("write",), f"quantize nvfp4 (emulated), {calib} calib"))
    export = ["export", "--checkpoint", ckpt, "--quiet", "--overwrite"]
    out += [
        Stage("export", _cli(*export, "--out", bundle), ("write",), "ONNX export (bundle)"),
        Stage("rtx-fp16", _cli(*export, "--out", str(w / "bundle-rtx-fp16"), "--target", "rtx",
                               "--engine-precision", "fp16"), ("write",), "TensorRT-RTX engines fp16 (CPU)"),
        Stage("rtx-fp8", _cli(*export, "--out", str(w / "bundle-rtx-fp8"), "--target", "rtx", "--recipe", "fp8",
                              "--calib", calib), ("write",), f"TensorRT-RTX engines fp8, {calib} calib (CPU)"),
        Stage("inspect", _cli("inspect", bundle), ("export",), "bundle load + hash verify (inspect)"),
        Stage("verify", _cli("verify", bundle, "--checkpoint", ckpt, "--backend", "onnxruntime", "--samples", "1",
                             "--tolerance", "1.0"), ("export",), "verify: ONNX Runtime vs torch, 1 sample"),
        Stage("plan-ort", _probe("plan", bundle, "--backend", "onnxruntime", "--steps", str(opts.plan_steps)),
              ("export",), f"plan, ONNX Runtime, {opts.plan_steps} block steps"),
        # Keyframes 0, 8 and 16: the first has less than the 2 s of history a prompt needs (skipped by design).
        Stage("eval", _cli("eval", "--source", "nuscenes", "--dataroot", nus, "--bundle", bundle, "--stride", "8",
                           "--limit", "3", "--out", str(w / "eval"), "--overwrite", "--no-progress"), ("export",),
              "eval, 2 nuScenes samples, ONNX Runtime"),
    ]
    prefix = loopback_prefix()
    ros = _probe("ros", bundle, "--bundle")
    out.append(Stage("ros-configure", [*prefix, *ros] if prefix else [], ("export",),
                     "ROS 2 planner node configure (bundle)"))
    if opts.stages is not None:
        out = [s for s in out if s.name in opts.stages or s.name == "write"]
    return out


def run_stage(argv: list[str], timeout_s: float, env: dict[str, str]) -> tuple[int | None, float, int, str, bool]:
    """``(rc, wall_s, peak_rss_bytes, output, timed_out)`` of ``argv`` in its own process group."""
    t0 = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          start_new_session=True) as proc:
        chunks: list[bytes] = []
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        timed_out, status, usage = False, None, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            chunk = proc.stdout.read() if proc.stdout else None
            if chunk:
                chunks.append(chunk)
            if pid:
                break
            if time.perf_counter() - t0 > timeout_s and not timed_out:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        rest = proc.stdout.read() if proc.stdout else None
        if rest:
            chunks.append(rest)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return proc.returncode, wall, int(usage.ru_maxrss) * 1024, b"".join(chunks).decode(errors="replace"), timed_out


def _details(output: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return parsed
    return {}


def _error(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    text = "\n".join(lines[-12:])
    return text[-ERROR_TAIL:]


def _meminfo_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "nvidia-modelopt", "tensorrt_rtx_cu13",
                 "safetensors", "rclpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    from .measure import cpu_name

    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "ram_bytes": _meminfo_bytes(), "device": device,
            "platform": sys.platform}


@dataclass
class ScaleReport:
    shape: str
    published_as: str
    date: str
    machine: dict[str, Any]
    versions: dict[str, str | None]
    config: dict[str, Any]
    settings: dict[str, Any]
    parameters: int | None = None
    weight_bytes: int | None = None
    stages: list[StageResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _portable(text: str, work: Path) -> str:
    """``text`` without this machine's paths: the interpreter as ``python``, its environment as ``<venv>``, the
    scratch directory as ``<work>`` (result files are committed and compared across machines)."""
    for path in sorted({str(work.resolve()), str(work)}, key=len, reverse=True):
        if path not in (".", ""):
            text = text.replace(path, "<work>")
    return text.replace(sys.executable, "python").replace(sys.prefix, "<venv>")


def run_scale(opts: ScaleOptions, log: Callable[[str], None] = print,
              progress: Callable[[ScaleReport], None] | None = None) -> ScaleReport:
    if opts.shape not in SCALE_SHAPES:
        raise ScaleBenchError(f"--shape {opts.shape!r}: not one of {', '.join(SCALE_SHAPES)}")
    shape = SCALE_SHAPES[opts.shape]
    from .scale_shapes import hub_config

    if opts.work.exists():
        shutil.rmtree(opts.work)
    opts.work.mkdir(parents=True)
    report = ScaleReport(shape.name, shape.published_as, dt.date.today().isoformat(), machine(), _versions(),
                         hub_config(shape), {"timeout_s": opts.timeout_s, "plan_steps": opts.plan_steps,
                                             "calib": opts.calib, "force_external_data": opts.force_external_data,
                                             "work": _portable(str(opts.work), opts.work)})
    env = dict(os.environ)
    if opts.force_external_data:
        env["BLOCKPILOT_EXTERNAL_DATA_BYTES"] = "4096"  # every initializer over 4 KB goes to the graph's data file
    env["PYTHONUNBUFFERED"] = "1"
    done: dict[str, str] = {}
    for stage in stages_for(shape, opts):
        command = _portable(" ".join(stage.argv), opts.work)
        missing = [n for n in stage.needs if done.get(n) != "passed"]
        if missing or not stage.argv:
            reason = (f"needs stage {', '.join(missing)}, which did not pass" if missing else
                      "unshare and ip are needed for a loopback-only network namespace (DDS); not found")
            result = StageResult(stage.name, stage.what, "skipped", command, error=reason)
        else:
            log(f"[{shape.name}] {stage.name}: {stage.what} ...")
            rc, wall, rss, output, timed_out = run_stage(stage.argv, opts.timeout_s, env)
            status = "timeout" if timed_out else ("passed" if rc == 0 else "failed")
            result = StageResult(stage.name, stage.what, status, command, rc, round(wall, 2), rss,
                                 details=json.loads(_portable(json.dumps(_details(output)), opts.work)))
            if status != "passed":
                why = (f"timed out after {opts.timeout_s:g} s; " if timed_out else "") + _error(output)
                result.error = _portable(why, opts.work)
            if stage.name == "write" and status == "passed":
                report.parameters = result.details.get("parameters")
                report.weight_bytes = result.details.get("weight_bytes")
            if report.weight_bytes:
                result.rss_x_weights = round(rss / report.weight_bytes, 2)
            log(f"[{shape.name}] {stage.name}: {status} in {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
        done[stage.name] = result.status
        report.stages.append(result)
        if progress is not None:
            progress(report)
    if not opts.keep:
        shutil.rmtree(opts.work, ignore_errors=True)
    return report
