"""What blockpilot needs of a JetPack line, the exact commands that install it, and the readers of what a machine has
(``dpkg-query`` listings, Python distributions), for ``blockpilot jetson doctor``.

Sources of the figures: JetPack 6.1/6.2 ship CUDA 12.6, TensorRT 10.3 and cuDNN 9.3 (Torch-TensorRT's JetPack page,
docs.pytorch.org/TensorRT getting_started/jetpack); JetPack 6.0 ships TensorRT 8.6 with CUDA 12.2 and cuDNN 8.9
(ultralytics/ultralytics#7196, NVIDIA/DL4AGX#67), so it has no TensorRT 10 for blockpilot's engines; JetPack 7.0 ships
CUDA 13.0, TensorRT 10.13 and cuDNN 9.12 (NVIDIA's JetPack 7.0 page, autoware#7108, jetson-containers#1263). The
PyTorch and Triton builds for JetPack 6 come from the Jetson AI Lab index (jp6/cu126, named in pytorch/TensorRT#3453);
Thor's SBSA CUDA 13 takes PyTorch's own cu130 aarch64 wheels.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import BlockpilotError
from .commands import Runner, ToolMissingError
from .platform import parse_dpkg_query


class ListingError(BlockpilotError, ValueError):
    """A recorded package listing that cannot be read; the message names the file."""


@dataclass(frozen=True)
class JetPackLine:
    """One JetPack major version: what it runs and how its missing parts are installed."""

    jetpack: str  # "6"
    min_jetpack: str  # the first release with TensorRT 10 (blockpilot's engines and plugin need it)
    min_l4t: str
    ubuntu: str
    ros: str  # the ROS 2 distribution of that Ubuntu
    cuda_major: int
    cuda_apt: str
    cudnn_apt: str
    torch_index: str
    upgrade: str  # how a release below min_jetpack gets there


LINES: Mapping[str, JetPackLine] = MappingProxyType({
    "6": JetPackLine("6", "6.1", "36.4", "22.04", "humble", 12, "cuda-toolkit-12-6", "libcudnn9-cuda-12",
                     "https://pypi.jetson-ai-lab.io/jp6/cu126",
                     "sudo sed -i 's/r36\\.3/r36.4/' /etc/apt/sources.list.d/nvidia-l4t-apt-source.list && sudo apt "
                     "update && sudo apt dist-upgrade && sudo apt install nvidia-jetpack   (or reflash JetPack 6.2 "
                     "with SDK Manager)"),
    "7": JetPackLine("7", "7.0", "38.2", "24.04", "jazzy", 13, "cuda-toolkit-13-0", "libcudnn9-cuda-13",
                     "https://download.pytorch.org/whl/cu130", "reflash JetPack 7 with SDK Manager"),
})
DEFAULT_LINE = MappingProxyType({"orin": "6", "thor": "7"})  # when the JetPack release is unknown

# dpkg-query patterns the doctor asks about (globs, as dpkg-query -W takes them).
DPKG_PATTERNS = ("nvidia-l4t-core", "nvidia-jetpack", "tensorrt", "libnvinfer10", "libnvinfer8", "python3-libnvinfer",
                 "cuda-toolkit-[0-9]*", "cuda-cudart-[0-9]*", "libcudnn[0-9]*", "ros-*-rclpy")
# component -> Python distribution names, first found wins.
DISTRIBUTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "torch": ("torch",), "triton": ("triton", "pytorch-triton"), "cuda-python": ("cuda-python", "cuda-bindings"),
    "pycuda": ("pycuda",), "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "rclpy": ("rclpy", "ros-rclpy")})


def line_for(platform_name: str, jetpack: str | None) -> JetPackLine:
    """The JetPack line of a platform: its installed JetPack's major, else the platform's usual one."""
    major = (jetpack or "").split(".")[0]
    return LINES.get(major) or LINES[DEFAULT_LINE.get(platform_name, "6")]


def version_tuple(version: str, parts: int = 3) -> tuple[int, ...]:
    """``"10.3.0.30-1+cuda12.5"`` -> ``(10, 3, 0)``; missing parts are 0."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("-")[0].split("+")[0])[:parts]]
    return tuple(numbers + [0] * (parts - len(numbers)))


def major_minor(version: str) -> str:
    return ".".join(map(str, version_tuple(version, 2)))


def query_dpkg(runner: Runner) -> dict[str, str]:
    """Installed versions of :data:`DPKG_PATTERNS` through ``dpkg-query -W`` (``{}`` without dpkg)."""
    try:
        result = runner(["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *DPKG_PATTERNS],
                        None)
    except ToolMissingError:
        return {}
    return parse_dpkg_query(result.stdout)  # exit 1 only says a pattern matched nothing


def read_listing(path: str | Path) -> dict[str, str]:
    """A recorded ``dpkg-query -W`` listing (``Package<TAB>Version`` lines, or with the status column)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ListingError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    found = parse_dpkg_query(text)
    if text.strip() and not found:
        raise ListingError(f"{path}: no 'package<TAB>version' lines (expected `dpkg-query -W` output)")
    return found


def _metadata_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def python_versions(lookup: Callable[[str], str | None] = _metadata_version) -> dict[str, str]:
    """component -> ``(distribution, version)`` flattened to ``"version"`` of :data:`DISTRIBUTIONS` found through
    ``lookup`` (package metadata: nothing is imported)."""
    found: dict[str, str] = {}
    for component, names in DISTRIBUTIONS.items():
        version = next((v for v in map(lookup, names) if v), None)
        if version:
            found[component] = version
    return found


def dpkg_match(packages: Mapping[str, str], *patterns: str) -> tuple[str, str] | None:
    """The ``(package, version)`` whose name matches the first regular expression of ``patterns`` that matches any
    (among several names, the highest: ``libcudnn9-cuda-12`` before ``libcudnn8``)."""
    for pattern in patterns:
        names = sorted((n for n in packages if re.fullmatch(pattern, n)), reverse=True)
        if names:
            return names[0], packages[names[0]]
    return None
