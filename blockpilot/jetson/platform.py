"""Which Jetson this is, and which JetPack, TensorRT and CUDA it runs.

The SoC and module come from the device tree (``/proc/device-tree/compatible``, NUL-separated, e.g.
``nvidia,p3737-0000+p3701-0005\\0nvidia,p3701-0005\\0nvidia,tegra234\\0`` on an AGX Orin 64GB), the Jetson Linux
(L4T) release from ``/etc/nv_tegra_release``. Installed package versions (``dpkg-query``: ``nvidia-jetpack``,
``libnvinfer10``) and ``/usr/local/cuda/version.json`` win when present; otherwise :data:`RELEASES` maps the L4T
release to JetPack, TensorRT and CUDA, and :attr:`JetsonPlatform.sources` says which figure came from where.
Every function takes file contents or a root directory, so tests feed sample files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..errors import BlockpilotError
from .commands import Runner, ToolMissingError, run_command

NV_TEGRA_RELEASE = "etc/nv_tegra_release"
DT_COMPATIBLE = ("proc/device-tree/compatible", "sys/firmware/devicetree/base/compatible")
DT_MODEL = "proc/device-tree/model"
CUDA_VERSION_JSON = "usr/local/cuda/version.json"
PACKAGES = ("nvidia-jetpack", "libnvinfer10", "nvidia-l4t-core")


class PlatformError(BlockpilotError, ValueError):
    """The platform cannot be identified as asked."""


class PlatformFileError(PlatformError):
    """A platform file that exists but cannot be read or parsed; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {reason}")


class UnsupportedJetsonError(PlatformError):
    """A Jetson that blockpilot does not target (Xavier, TX2, Nano): only Orin and Thor are."""


# SoC (device-tree compatible) -> blockpilot platform name and GPU compute capability (the ENGINE_TARGETS ``sm``).
SOCS: Mapping[str, tuple[str, str]] = MappingProxyType({"tegra234": ("orin", "8.7"), "tegra264": ("thor", "11.0")})
OLDER_SOCS = MappingProxyType({"tegra194": "Jetson Xavier", "tegra186": "Jetson TX2", "tegra210": "Jetson Nano/TX1"})

# Module part numbers (the ``pNNNN-NNNN`` after the carrier's ``+``). Sources: NVIDIA's force-recovery USB id list as
# quoted in flashing guides (P3701-0000/0004/0005/0008, P3767-0000/0001/0003/0004/0005), the Jetson Linux flash
# configs (jetson-agx-orin-devkit.conf, jetson-orin-nano-devkit.conf) and the AGX Thor dev kit DTB name
# tegra264-p4071-0000+p3834-0008-nv.dtb (T5000 module).
MODULES: Mapping[str, str] = MappingProxyType({
    "p3701-0000": "Jetson AGX Orin 32GB (developer kit module)",
    "p3701-0004": "Jetson AGX Orin 32GB",
    "p3701-0005": "Jetson AGX Orin 64GB",
    "p3701-0008": "Jetson AGX Orin Industrial 64GB",
    "p3767-0000": "Jetson Orin NX 16GB",
    "p3767-0001": "Jetson Orin NX 8GB",
    "p3767-0003": "Jetson Orin Nano 8GB",
    "p3767-0004": "Jetson Orin Nano 4GB",
    "p3767-0005": "Jetson Orin Nano 8GB (developer kit module)",
    "p3834-0008": "Jetson AGX Thor T5000 128GB",
})


@dataclass(frozen=True)
class Release:
    """One row of the L4T -> JetPack -> TensorRT / CUDA matrix. ``verified`` lists the fields that the cited
    ``source`` states outright; the others are carried over from the same JetPack line and marked unverified."""

    l4t: str
    jetpack: str
    tensorrt: str | None
    cuda: str | None
    verified: tuple[str, ...]
    source: str


# Looked up with the search tool; each row cites what it was checked against.
RELEASES: tuple[Release, ...] = (
    # JetPack 6.0: L4T 36.3 (dusty-nv/jetson-containers l4t_version.py). It ships TensorRT 8.6, which has no
    # IPluginV3; left out of the TensorRT column on purpose (unverified here).
    Release("36.3.0", "6.0", None, None, ("jetpack",), "dusty-nv/jetson-containers l4t_version.py"),
    # JetPack 6.1: CUDA 12.6, TensorRT 10.3, cuDNN 9.3 (pytorch.org/TensorRT getting_started/jetpack, quoting the
    # JetPack 6.1 release notes); L4T 36.4 = 6.1 (jetson-containers; Astute-Systems/bsp v1.3.0 release table).
    Release("36.4.0", "6.1", "10.3", "12.6", ("jetpack", "tensorrt", "cuda"),
            "pytorch.org/TensorRT getting_started/jetpack (JetPack 6.1); jetson-containers l4t_version.py"),
    Release("36.4.2", "6.1.1", "10.3", "12.6", ("jetpack",), "jetson-containers l4t_version.py (36.4.2 = 6.1.1)"),
    # JetPack 6.2 = L4T 36.4.3: CUDA 12.6, TensorRT 10.3, cuDNN 9.3 (docs.pytorch.org/TensorRT jetpack.rst
    # "JetPack 6.2"; pytorch/TensorRT#3453 "jetpack 6.2 has cuda 12.6, tensorrt 10.3").
    Release("36.4.3", "6.2", "10.3", "12.6", ("jetpack", "tensorrt", "cuda"),
            "docs.pytorch.org/TensorRT jetpack.rst (JetPack 6.2); pytorch/TensorRT#3453"),
    # JetPack 6.2.1 = L4T 36.4.4 (Astute-Systems/bsp v1.3.0, from NVIDIA's JetPack archive); the 36.4.7 security
    # update still reports nvidia-jetpack 6.2.1+b38 with libnvinfer10 10.3.0.30 and cuda-cudart-12-6 (device logs).
    Release("36.4.4", "6.2.1", "10.3", "12.6", ("jetpack",), "Astute-Systems/bsp v1.3.0 release notes"),
    Release("36.4.7", "6.2.1", "10.3", "12.6", ("jetpack", "tensorrt", "cuda"),
            "device package lists (nvidia-l4t-core 36.4.7, nvidia-jetpack 6.2.1+b38, libnvinfer10 10.3.0.30)"),
    # JetPack 6.2.2 = L4T 36.5 ("Jetson Linux 36.5 ... supports JetPack 6.2.2", release notes as quoted); a device
    # log shows nvidia-jetpack 6.2.2+b24 with libnvinfer10 10.3.0.30. CUDA 12.6 carried over: unverified.
    Release("36.5.0", "6.2.2", "10.3", "12.6", ("jetpack", "tensorrt"),
            "Jetson Linux 36.5 release notes (quoted); device log (JetPack 6.2.2+b24, libnvinfer10 10.3.0.30)"),
    # JetPack 7.0 = Jetson Linux 38.2/38.2.1 (developer.nvidia.com/embedded/jetpack/downloads/archive-7.0); CUDA 13.0
    # on Thor (NVIDIA blog "What's New in CUDA Toolkit 13.0 for Jetson Thor"). TensorRT 10.13: only secondary
    # sources (project notes citing the JetPack 7.0 forum announcement), so unverified here.
    Release("38.2.0", "7.0", "10.13", "13.0", ("jetpack", "cuda"),
            "NVIDIA JetPack 7.0 archive page; NVIDIA blog on CUDA 13.0 for Jetson Thor"),
    Release("38.2.1", "7.0", "10.13", "13.0", ("jetpack", "cuda"), "NVIDIA JetPack 7.0 archive page (38.2/38.2.1)"),
    # JetPack 7.1 = Jetson Linux 38.4 (archive-7.1 page); TensorRT 10.13, CUDA 13.0 per roboflow/inference#1935 and
    # #2478 (built and tested on a Thor; not an NVIDIA page).
    Release("38.4.0", "7.1", "10.13", "13.0", ("jetpack",), "NVIDIA JetPack 7.1 archive page; roboflow/inference#1935"),
    # JetPack 7.2 = L4T 39.2: CUDA 13.2, TensorRT 10.16.2.10, read off a Thor flashed with 7.2
    # (roboflow/inference#2478): a device report, not an NVIDIA page, so unverified.
    Release("39.2.0", "7.2", "10.16", "13.2", (), "roboflow/inference#2478 (component table read from a Thor device)"),
)


@dataclass(frozen=True)
class L4TRelease:
    major: int
    minor: int
    patch: int
    board: str = ""

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


_RELEASE_RE = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?\s*(?:,(.*))?$")


def parse_nv_tegra_release(text: str, path: str | Path = "/" + NV_TEGRA_RELEASE) -> L4TRelease:
    """``# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...`` -> 36.4.3."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    match = _RELEASE_RE.match(first)
    if match is None:
        raise PlatformFileError(path, f"expected '# R<major> (release), REVISION: <minor>.<patch>, ...', got "
                                      f"{first[:80]!r}")
    fields = dict(part.strip().split(":", 1) for part in (match.group(4) or "").split(",") if ":" in part)
    return L4TRelease(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0),
                      fields.get("BOARD", "").strip())


def parse_compatible(data: bytes | str, path: str | Path = "/" + DT_COMPATIBLE[0]) -> tuple[str, ...]:
    """The device tree's NUL-separated compatible strings, most specific first."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise PlatformFileError(path, f"not UTF-8 text ({exc})") from None
    entries = tuple(e.strip() for e in text.split("\0") if e.strip())
    if not entries:
        raise PlatformFileError(path, "empty (no compatible strings)")
    return entries


def parse_model(data: bytes | str) -> str:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return text.replace("\0", "").strip()


def jetson_soc(compatible: tuple[str, ...]) -> str | None:
    """``tegra234`` from ``nvidia,tegra234``; ``None`` for a device tree of another vendor."""
    return next((e.split(",", 1)[1] for e in compatible if re.fullmatch(r"nvidia,tegra\d+", e)), None)


def module_part(compatible: tuple[str, ...]) -> tuple[str | None, bool]:
    """The module part number and whether the tree is a ``-super`` variant (Orin Nano/NX Super modes):
    ``nvidia,p3768-0000+p3767-0005-super`` -> (``p3767-0005``, True)."""
    for entry in compatible:
        match = re.fullmatch(r"nvidia,p\d{4}-\d{4}\+(p\d{4}-\d{4})(-super)?(?:-[\w-]+)?", entry)
        if match:
            return match.group(1), match.group(2) is not None
    alone = next((e.split(",", 1)[1] for e in compatible if re.fullmatch(r"nvidia,p\d{4}-\d{4}", e)), None)
    return alone, False


def parse_cuda_version_json(text: str, path: str | Path = "/" + CUDA_VERSION_JSON) -> str:
    """``{"cuda": {"version": "12.6.68"}, ...}`` -> ``12.6.68``."""
    try:
        version = json.loads(text)["cuda"]["version"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PlatformFileError(path, f"expected JSON with cuda.version ({exc})") from None
    return str(version)


def parse_dpkg_query(text: str) -> dict[str, str]:
    """``Package<TAB>Status<TAB>Version`` lines -> the versions of installed (``ii``) packages. Plain ``dpkg-query -W``
    lines (``Package<TAB>Version``; an empty version: known, not installed) count too; an ``:arm64`` qualifier goes."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        installed = len(parts) == 2 or (len(parts) == 3 and parts[1].strip().startswith("ii"))
        if installed and parts[-1].strip():
            out[parts[0].strip().split(":", 1)[0]] = parts[-1].strip()
    return out


def query_packages(runner: Runner = run_command) -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` through ``dpkg-query`` (``{}`` without dpkg: never required)."""
    try:
        result = runner(["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *PACKAGES], None)
    except ToolMissingError:
        return {}
    return parse_dpkg_query(result.stdout)  # exit 1 only says some package is absent; the rest are listed


def release_facts(l4t: L4TRelease) -> tuple[Release | None, bool]:
    """The matrix row of ``l4t`` and whether it matched exactly; else the newest row of the same major.minor line
    at or below it (a later security update keeps its line's TensorRT), else ``None``."""
    exact = next((r for r in RELEASES if r.l4t == l4t.version), None)
    if exact is not None:
        return exact, True
    key = (l4t.major, l4t.minor, l4t.patch)
    same_line = [r for r in RELEASES if tuple(map(int, r.l4t.split("."))) <= key
                 and r.l4t.split(".")[:2] == [str(l4t.major), str(l4t.minor)]]
    return (same_line[-1] if same_line else None), False


@dataclass(frozen=True)
class JetsonPlatform:
    """A Jetson blockpilot targets. ``sm`` is the compute capability as :mod:`blockpilot.export.targets` writes it;
    ``sources`` says where each version came from; ``None`` means unknown."""

    name: str  # "orin" | "thor": the engine target and quantization gate of the same name
    soc: str
    module: str
    part: str | None
    model: str
    sm: str
    l4t: str | None
    jetpack: str | None
    tensorrt: str | None
    cuda: str | None
    super_variant: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["sources"], out["notes"] = dict(self.sources), list(self.notes)
        return out

    def describe(self) -> str:
        rows = [("platform", f"{self.name} ({self.soc}, sm {self.sm})"), ("module", self.module),
                ("model", self.model or "-")]
        for key in ("l4t", "jetpack", "tensorrt", "cuda"):
            value = getattr(self, key)
            rows.append((key, f"{value or 'unknown'}" + (f"  [{self.sources[key]}]" if key in self.sources else "")))
        lines = [f"{k:<9} {v}" for k, v in rows]
        return "\n".join(lines + [f"note      {n}" for n in self.notes])


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def identify(compatible: bytes | str, release: str | None, model: bytes | str | None = None, *,
             packages: Mapping[str, str] | None = None, cuda_json: str | None = None,
             root: Path = Path("/")) -> JetsonPlatform | None:
    """The :class:`JetsonPlatform` these file contents describe, ``None`` for a non-NVIDIA device tree.

    ``release`` is ``/etc/nv_tegra_release``, ``packages`` the ``dpkg-query`` versions, ``cuda_json``
    ``/usr/local/cuda/version.json``; ``root`` only names the files in errors. Raises
    :class:`UnsupportedJetsonError` for a Jetson other than Orin or Thor, :class:`PlatformFileError` for a malformed
    file."""
    entries = parse_compatible(compatible, root / DT_COMPATIBLE[0])
    soc = jetson_soc(entries)
    if soc is None:
        return None
    if soc not in SOCS:
        raise UnsupportedJetsonError(f"{root / DT_COMPATIBLE[0]}: {soc} ({OLDER_SOCS.get(soc, 'unknown Tegra')}) is "
                                     "not a blockpilot target; Jetson Orin (tegra234) and Thor (tegra264) are")
    name, sm = SOCS[soc]
    part, super_variant = module_part(entries)
    model_text = parse_model(model) if model is not None else ""
    module = MODULES.get(part or "") or (model_text.removeprefix("NVIDIA ") or f"unknown Jetson {name.title()} module")
    packages = packages or {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    l4t = parse_nv_tegra_release(release, root / NV_TEGRA_RELEASE) if release is not None else None
    if l4t is None and "nvidia-l4t-core" in packages:
        parsed = re.match(r"(\d+)\.(\d+)\.(\d+)", packages["nvidia-l4t-core"])
        l4t = L4TRelease(int(parsed.group(1)), int(parsed.group(2)), int(parsed.group(3))) if parsed else None
        sources["l4t"] = "dpkg nvidia-l4t-core"
    elif l4t is not None:
        sources["l4t"] = str(root / NV_TEGRA_RELEASE)
    versions: dict[str, str | None] = {"jetpack": None, "tensorrt": None, "cuda": None}
    if l4t is not None:
        row, exact = release_facts(l4t)
        if row is None:
            notes.append(f"L4T {l4t.version} is not in the version matrix: JetPack, TensorRT and CUDA unknown")
        else:
            for key in versions:
                versions[key] = getattr(row, key)
                if versions[key] is not None:
                    how = "verified" if key in row.verified and exact else "unverified"
                    sources[key] = f"matrix L4T {row.l4t}, {how}" + ("" if exact else f" (nearest to {l4t.version})")
    else:
        notes.append(f"{root / NV_TEGRA_RELEASE} is missing: L4T release unknown")
    if cuda_json is not None:
        versions["cuda"] = _major_minor(parse_cuda_version_json(cuda_json, root / CUDA_VERSION_JSON))
        sources["cuda"] = str(root / CUDA_VERSION_JSON)
    installed = {"jetpack": packages.get("nvidia-jetpack", "").split("+")[0] or None,
                 "tensorrt": (packages.get("libnvinfer10") or packages.get("libnvinfer8", "")).split("-")[0] or None}
    for key, value in installed.items():
        if value is None:
            continue
        if versions[key] is not None and _major_minor(value) != _major_minor(str(versions[key])):
            notes.append(f"installed {key} {value} differs from the matrix's {versions[key]}; the installed one counts")
        versions[key] = value
        sources[key] = "dpkg " + ("nvidia-jetpack" if key == "jetpack" else
                                  "libnvinfer10" if "libnvinfer10" in packages else "libnvinfer8")
    return JetsonPlatform(name=name, soc=soc, module=module, part=part, model=model_text, sm=sm,
                          l4t=l4t.version if l4t else None, jetpack=versions["jetpack"], tensorrt=versions["tensorrt"],
                          cuda=versions["cuda"], super_variant=super_variant, sources=sources, notes=tuple(notes))


def _read(path: Path) -> bytes | None:
    if not path.exists():
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PlatformFileError(path, f"cannot be read ({exc.strerror or exc})") from None


def detect_platform(root: str | Path = "/", *, runner: Runner | None = run_command,
                    packages: Mapping[str, str] | None = None) -> JetsonPlatform | None:
    """The Jetson under ``root`` (``/`` normally), or ``None`` off-Jetson (no NVIDIA device tree, e.g. x86).
    ``runner`` runs ``dpkg-query`` (``None``: skip the package query); ``packages`` (dpkg versions already read,
    e.g. a recorded listing) replaces the query."""
    root = Path(root)
    compatible = next((data for rel in DT_COMPATIBLE if (data := _read(root / rel)) is not None), None)
    if compatible is None or jetson_soc(parse_compatible(compatible, root / DT_COMPATIBLE[0])) is None:
        return None
    release, model, cuda = (_read(root / rel) for rel in (NV_TEGRA_RELEASE, DT_MODEL, CUDA_VERSION_JSON))
    if packages is None:
        packages = query_packages(runner) if runner is not None else {}
    return identify(compatible, release.decode("utf-8", errors="replace") if release is not None else None, model,
                    packages=packages, cuda_json=cuda.decode("utf-8", errors="replace") if cuda is not None else None,
                    root=root)
