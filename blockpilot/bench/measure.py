"""Clocks, the device's name and its measured memory bandwidth."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def p50_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls after ``warmup`` (synced on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (the platform's processor string elsewhere)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


@dataclass(frozen=True)
class Bandwidth:
    """Memory bandwidth from a timed copy: ``2 * bytes`` (read + write) over the best time."""

    method: str
    bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return 2 * self.bytes / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gb_per_s": self.bytes_per_s / 1e9}


def measure_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> Bandwidth:
    """Copy a ``mib`` MiB buffer ``repeats`` times (a device-to-device copy on CUDA, a memcpy through torch's
    threads on the CPU) and keep the fastest."""
    n = mib * (1 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    method = "device-to-device copy" if device.type == "cuda" else f"memcpy ({torch.get_num_threads()} threads)"
    return Bandwidth(method, n, best)
