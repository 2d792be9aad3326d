"""``blockpilot jetson doctor``: each part of the stack a bundle (or, without one, an on-device build) needs, found
against needed, with the exact command that installs what is missing.

:func:`diagnose` is pure: it takes the platform (:func:`blockpilot.jetson.platform.detect_platform`), the dpkg
versions (``dpkg-query -W``, live or recorded), the Python distributions (package metadata) and the loaded bundle, so
tests feed recorded listings of real boards. A bundle cannot run here (``ok`` false, exit 1) when any row fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import BlockpilotError
from ..export.targets import has_native_attention
from ..formats.bundle import Artifact, Bundle
from .platform import JetsonPlatform
from .stack import JetPackLine, dpkg_match, line_for, major_minor, version_tuple

OK, FAIL, WARN, NOT_NEEDED = "ok", "fail", "warn", "not needed"
BUILD_HERE = "blockpilot jetson build --checkpoint CHECKPOINT_DIR --out BUNDLE_DIR"
ROUTE_NEEDS = {"plugin": "torch + Triton on this device (the plugin's kernel)", "native": "TensorRT 10.14+",
               "decomposed": "TensorRT only"}


@dataclass(frozen=True)
class Check:
    component: str
    found: str
    needed: str
    status: str  # ok | fail | warn | not needed
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"component": self.component, "found": self.found, "needed": self.needed, "status": self.status,
                "fix": self.fix}


@dataclass(frozen=True)
class DoctorReport:
    platform: JetsonPlatform | None
    bundle: str | None
    attention: str  # as requested
    route: str | None  # the LM-step route that would run (bundle) or be built (no bundle)
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "jetson": self.platform is not None,
                "platform": self.platform.to_dict() if self.platform else None, "bundle": self.bundle,
                "attention": {"requested": self.attention, "route": self.route},
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes)}

    def table(self) -> str:
        heads = ("component", "found", "needed", "status", "fix")
        rows = [heads, *((c.component, c.found, c.needed, c.status, c.fix) for c in self.checks)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths[:-1]) + "  ---")
        what = f"bundle {self.bundle}" if self.bundle else "an on-device build (`blockpilot jetson build`)"
        failed = sum(c.status == FAIL for c in self.checks)
        verdict = (f"ok: {what} can run here" + (f" (attention {self.route})" if self.route else "") if self.ok else
                   f"FAIL: {what} cannot run here ({failed} problem{'s' * (failed != 1)})")
        return "\n".join([*lines, "", *(f"note: {n}" for n in self.notes), verdict])


@dataclass(frozen=True)
class _Found:
    """What was found, as the rows need it."""

    platform: JetsonPlatform
    line: JetPackLine
    dpkg: Mapping[str, str]
    python: Mapping[str, str]

    def deb(self, *patterns: str) -> tuple[str, str] | None:
        return dpkg_match(self.dpkg, *patterns)

    @property
    def tensorrt(self) -> tuple[str | None, str]:
        """TensorRT's version and where it came from (dpkg; the L4T matrix only without a package listing)."""
        hit = self.deb("libnvinfer10", "libnvinfer8", "tensorrt")
        if hit is not None:
            return hit[1].split("-")[0], f"dpkg {hit[0]}"
        if not self.dpkg and self.platform.tensorrt:
            return self.platform.tensorrt, "L4T matrix, no package listing"
        return None, ""

    @property
    def cuda(self) -> tuple[str | None, str]:
        """CUDA's major.minor and where it came from: version.json, dpkg, or the L4T matrix without a listing."""
        p, source = self.platform, self.platform.sources.get("cuda", "")
        hit = self.deb(r"cuda-toolkit-\d+-\d+", r"cuda-cudart-\d+-\d+")
        if "version.json" in source and p.cuda:
            return p.cuda, source
        if hit is not None:
            return major_minor(hit[1]), f"dpkg {hit[0]}"
        if not self.dpkg and p.cuda:
            return p.cuda, "L4T matrix, no package listing"
        return None, ""

    @property
    def plugin_runtime(self) -> bool:
        return "torch" in self.python and "triton" in self.python


def _lm_engines(bundle: Bundle, platform: JetsonPlatform) -> list[Artifact]:
    return [a for a in bundle.engines() if a.sm == platform.sm and a.role == "lm_step"]


def _bundle_route(bundle: Bundle, found: _Found, attention: str) -> tuple[str | None, Artifact | None, list[Check]]:
    """The route the runtime would take in ``bundle`` here (its own order: native, decomposed, plugin) and the
    engines row."""
    from ..runtime.trt_backend import VARIANT_ORDER

    p = found.platform
    targets = sorted({f"{a.target} (sm {a.sm})" for a in bundle.engines()})
    lm = _lm_engines(bundle, p)
    needed = f"{p.name} engines (sm {p.sm})"
    if not lm:
        return None, None, [Check("engines", ", ".join(targets) or "none (ONNX graphs only)", needed, FAIL,
                                  f"build them on this device: {BUILD_HERE}")]
    variants = sorted({a.variant for a in lm}, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99)
    engines = Check("engines", ", ".join(targets) + f"; lm_step {'/'.join(variants)}", needed, OK)
    if attention != "auto" and attention not in variants:
        trt = found.tensorrt[0]
        fix = (f"TensorRT {trt} has no attention layer (10.14+); build decomposed or plugin engines" if
               attention == "native" and trt and not has_native_attention("tensorrt", trt) else
               f"{BUILD_HERE} --attention {attention}")
        return None, None, [engines, Check("attention route", f"lm_step engines: {', '.join(variants)}", attention,
                                           FAIL, fix)]
    route = variants[0] if attention == "auto" else attention
    return route, next(a for a in lm if a.variant == route), [engines]


def _built_route(found: _Found, attention: str) -> tuple[str | None, list[Check]]:
    """Without a bundle: the route ``jetson build --attention`` takes here (torch and Triton as found)."""
    from .profiles import engine_profile

    try:
        route = engine_profile(found.platform, attention=attention, plugin_runtime=found.plugin_runtime).attention
    except BlockpilotError as exc:
        return None, [Check("attention route", attention, "a route this TensorRT builds", FAIL, str(exc))]
    return (None if route == "auto" else route), []


def _route_check(route: str, found: _Found, tensorrt: str | None) -> Check:
    status, fix = OK, ""
    if route == "plugin" and not found.plugin_runtime:
        status, fix = FAIL, f"install torch and Triton (below), or build without the plugin: {BUILD_HERE}"
    elif route == "native" and tensorrt is not None and not has_native_attention("tensorrt", tensorrt):
        status, fix = FAIL, f"TensorRT {tensorrt} has no attention layer: {BUILD_HERE}"
    return Check("attention route", route, ROUTE_NEEDS.get(route, route), status, fix)


def _jetpack(found: _Found) -> Check:
    p, line = found.platform, found.line
    have = f"L4T {p.l4t or 'unknown'} / JetPack {p.jetpack or 'unknown'}"
    needed = f"JetPack {line.min_jetpack}+ (L4T {line.min_l4t}+, TensorRT 10)"
    if p.jetpack is None:
        return Check("L4T / JetPack", have, needed, WARN, "not in blockpilot's version matrix; check the rows below")
    if version_tuple(p.jetpack) < version_tuple(line.min_jetpack):
        return Check("L4T / JetPack", have, needed, FAIL, line.upgrade)
    return Check("L4T / JetPack", have, needed, OK)


def _tensorrt(found: _Found, engine: Artifact | None) -> Check:
    version, source = found.tensorrt
    built = engine.tools.get("tensorrt") if engine is not None else None
    needed = (f"{major_minor(built)} (the engines were built with {built})" if built else "10.x (TensorRT 10)")
    have = f"{version} [{source}]" if version else "not installed"
    if version is None:
        return Check("TensorRT", have, needed, FAIL, "sudo apt install tensorrt")
    if version_tuple(version)[0] < 10:
        return Check("TensorRT", have, needed, FAIL, f"TensorRT 10 comes with JetPack {found.line.min_jetpack}: see "
                                                     "L4T / JetPack")
    if built and major_minor(built) != major_minor(version):
        return Check("TensorRT", have, needed, FAIL, f"engines only load on the TensorRT that built them: {BUILD_HERE}")
    return Check("TensorRT", have, needed, WARN if "matrix" in source else OK,
                 "no package listing: run on the device, or pass --dpkg-listing" if "matrix" in source else "")


def _tensorrt_python(found: _Found) -> Check:
    trt, _ = found.tensorrt
    needed = f"the tensorrt module{f' {major_minor(trt)}' if trt else ''}, visible to this Python"
    have = found.python.get("tensorrt")
    system = found.deb(r"python3-libnvinfer")
    if have is None:
        if system is not None:
            return Check("TensorRT Python", f"{system[1].split('-')[0]} [system Python only]", needed, FAIL,
                         "python3 -m venv --system-site-packages VENV  (JetPack's bindings live in the system Python)")
        return Check("TensorRT Python", "not installed", needed, FAIL, "sudo apt install python3-libnvinfer")
    if trt is not None and major_minor(have) != major_minor(trt):
        return Check("TensorRT Python", have, needed, FAIL,
                     "pip uninstall tensorrt  (a pip wheel hides JetPack's python3-libnvinfer)")
    return Check("TensorRT Python", f"{have} [this Python]", needed, OK)


def _cuda_major(found: _Found) -> int:
    """The CUDA major TensorRT was built for (``+cuda12.5`` in its dpkg version), else the JetPack line's."""
    hit = found.deb("libnvinfer10", "libnvinfer8", "tensorrt")
    tag = re.search(r"\+cuda(\d+)", hit[1]) if hit else None
    return int(tag.group(1)) if tag else found.line.cuda_major


def _cuda(found: _Found) -> Check:
    major = _cuda_major(found)
    needed, fix = f"{major}.x", f"sudo apt install {found.line.cuda_apt}"
    version, where = found.cuda
    if version is None:
        return Check("CUDA", "not installed", needed, FAIL, fix)
    status = OK if version_tuple(version)[0] == major else FAIL
    if status == OK and "matrix" in where:
        status = WARN
    return Check("CUDA", f"{version} [{where}]", needed, status, fix if status == FAIL else "")


def _cudnn(found: _Found, route: str | None) -> Check:
    hit = found.deb(r"libcudnn\d+(-cuda-\d+)?")
    have = f"{hit[1].split('-')[0]} [dpkg {hit[0]}]" if hit else "not installed"
    if route != "plugin":
        return Check("cuDNN", have, "not needed (TensorRT 10 runs without it)", OK if hit else NOT_NEEDED)
    ok = hit is not None and version_tuple(hit[1])[0] >= 9
    return Check("cuDNN", have, "9.x (JetPack's torch links it)", OK if ok else FAIL,
                 "" if ok else f"sudo apt install {found.line.cudnn_apt}")


def _cuda_python(found: _Found) -> Check:
    major, cuda = _cuda_major(found), found.cuda[0]
    low = version_tuple(cuda, 2) if cuda and version_tuple(cuda)[0] == major else (major, 6 if major == 12 else 0)
    spec = f">={low[0]}.{low[1]},<{major + 1}"  # the bindings of this CUDA major, not older than its minor
    needed, fix = f"cuda-python {spec} (the TensorRT backend's device memory)", f'pip install "cuda-python{spec}"'
    have = found.python.get("cuda-python")
    if have is None:
        if "pycuda" in found.python:
            return Check("cuda-python", f"absent; pycuda {found.python['pycuda']}", needed, OK)
        return Check("cuda-python", "not installed", needed, FAIL, fix)
    if version_tuple(have)[0] != major:
        return Check("cuda-python", have, needed, FAIL, f"{fix}  (cuda-python {version_tuple(have)[0]} needs a "
                                                          f"CUDA {version_tuple(have)[0]} driver)")
    if version_tuple(have, 2) < low:
        return Check("cuda-python", have, needed, FAIL, fix)
    return Check("cuda-python", have, needed, OK)


def _plugin_package(found: _Found, name: str, route: str | None) -> Check:
    have = found.python.get(name.lower())
    shown = have or "not installed"
    if route != "plugin":
        return Check(name, shown, f"not needed (route {route or 'unknown'})", OK if have else NOT_NEEDED)
    fix = f"pip install torch triton --index-url {found.line.torch_index}"
    return Check(name, shown, "installed (the plugin route)", OK if have else FAIL, "" if have else fix)


def _rclpy(found: _Found) -> Check:
    line = found.line
    needed = f"ROS 2 {line.ros} (Ubuntu {line.ubuntu}), for `blockpilot ros planner` only"
    fix = f"sudo apt install ros-{line.ros}-ros-base  (after adding the ROS 2 apt source, docs.ros.org)"
    hit = found.deb(r"ros-[a-z]+-rclpy")
    if hit is not None:
        distro = hit[0].split("-")[1]
        have = f"{hit[1].split('-')[0]} ({distro}) [dpkg {hit[0]}]"
        return Check("rclpy", have, needed, OK if distro == line.ros else WARN, "" if distro == line.ros else fix)
    if "rclpy" in found.python:
        return Check("rclpy", f"{found.python['rclpy']} [pip]", needed, OK)
    return Check("rclpy", "not installed", needed, WARN, fix)


def diagnose(platform: JetsonPlatform | None, dpkg: Mapping[str, str], python: Mapping[str, str], *,
             bundle: Bundle | None = None, attention: str = "auto", root: str = "/") -> DoctorReport:
    """Every row for ``platform`` (``None``: not a Jetson) against ``bundle`` (``None``: what ``jetson build`` would
    build here with ``attention``)."""
    where = str(bundle.path) if bundle is not None else None
    if platform is None:
        check = Check("platform", f"not a Jetson (no NVIDIA Tegra device tree under {root})", "Jetson Orin or Thor",
                      FAIL, "run `blockpilot jetson doctor` on the Jetson")
        return DoctorReport(None, where, attention, None, (check,))
    found = _Found(platform, line_for(platform.name, platform.jetpack), dpkg, python)
    checks = [Check("platform", f"{platform.module} ({platform.name}, sm {platform.sm})", "Jetson Orin or Thor", OK)]
    engine: Artifact | None = None
    if bundle is not None:
        route, engine, rows = _bundle_route(bundle, found, attention)
    else:
        route, rows = _built_route(found, attention)
    checks += rows
    checks += [_jetpack(found), _tensorrt(found, engine), _tensorrt_python(found), _cuda(found)]
    if route is not None:
        checks.append(_route_check(route, found, found.tensorrt[0]))
    checks += [_cudnn(found, route), _cuda_python(found), _plugin_package(found, "torch", route),
               _plugin_package(found, "Triton", route), _rclpy(found)]
    notes = [] if dpkg else ["no dpkg package listing: versions come from the L4T matrix (--dpkg-listing FILE)"]
    return DoctorReport(platform, where, attention, route, tuple(checks), tuple(notes + list(platform.notes)))
