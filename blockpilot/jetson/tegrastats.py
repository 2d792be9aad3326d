"""``tegrastats`` lines parsed, and a recorder that runs it in the background and summarises a window.

Formats differ by module and release (samples in the tests come from real boards):

* AGX Orin, JetPack 6: ``GR3D_FREQ 0%@[0,0]`` (utilisation, then one frequency per GPC), rails ``VDD_GPU_SOC``,
  ``VDD_CPU_CV``, ``VIN_SYS_5V0`` (+ ``VDDQ_VDD2_1V8AO``, unconnected ``NC``); Orin Nano/NX: ``GR3D_FREQ 62%@612``
  or ``GR3D_FREQ 7%``, rails ``VDD_IN``, ``VDD_CPU_GPU_CV``, ``VDD_SOC``.
* AGX Thor, JetPack 7.0/7.1: ``GR3D_FREQ @[314,314,314]`` (frequencies only, no utilisation); JetPack 7.2 drops
  ``GR3D_FREQ``. Rails ``VDD_GPU``, ``VDD_CPU_SOC_MSS``, ``VIN_SYS_5V0``, ``VIN``; ``VDD_GPU`` can read slightly
  negative at idle (calibration offset).
* Power is ``now/avg`` or ``now/avg/max`` mW, temperatures ``cpu@45.5C`` or ``cpu@47.9C/48.3C``; a sensor that is
  off reads ``-256C``. Only the instantaneous values are kept: the window statistics are ours.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import BlockpilotError

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+(?:\.\d+)?)%)?(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"(?<![\w%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (-?\d+)mW(?:/-?\d+mW){0,2}")
_STAMP = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
OFF_SENSOR_C = -200.0  # below this a reading is a powered-off sensor (tegrastats prints -256C)
UNCONNECTED_RAILS = frozenset({"NC"})


class TegrastatsError(BlockpilotError, RuntimeError):
    """tegrastats is missing, or a line is not a tegrastats line."""


class TegrastatsMissingError(TegrastatsError, FileNotFoundError):
    """No ``tegrastats`` executable: not a Jetson (or JetPack's tools are not on ``PATH``)."""


@dataclass(frozen=True)
class TegrastatsSample:
    """One line. ``cpu_percent`` has ``None`` for an offline core; ``gpu_percent`` is ``None`` where the line has no
    utilisation (Thor); temperatures in °C and power in mW by sensor / rail name as printed."""

    timestamp: str | None
    ram_used_mb: int | None
    ram_total_mb: int | None
    swap_used_mb: int | None
    cpu_percent: tuple[float | None, ...]
    cpu_mhz: tuple[int | None, ...]
    gpu_percent: float | None
    gpu_mhz: tuple[int, ...]
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)


def parse_line(line: str) -> TegrastatsSample:
    """Parse one tegrastats line; :class:`TegrastatsError` for a line with none of its fields."""
    ram, swap, cpu, gr3d = _RAM.search(line), _SWAP.search(line), _CPU.search(line), _GR3D.search(line)
    cores: list[tuple[float | None, int | None]] = []
    for entry in (cpu.group(1).split(",") if cpu else []):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)%(?:@(\d+))?\s*", entry)  # "14%@2188", "off" when offline
        if match is None:
            cores.append((None, None))
        else:
            cores.append((float(match.group(1)), int(match.group(2)) if match.group(2) else None))
    temps = {name: float(v) for name, v in _TEMP.findall(line) if float(v) > OFF_SENSOR_C}
    power = {name: int(v) for name, v in _POWER.findall(line) if name not in UNCONNECTED_RAILS}
    if not (ram or cpu or temps or power):
        raise TegrastatsError(f"not a tegrastats line: {line.strip()[:120]!r}")
    stamp = _STAMP.match(line)
    return TegrastatsSample(
        timestamp=stamp.group(1) if stamp else None,
        ram_used_mb=int(ram.group(1)) if ram else None, ram_total_mb=int(ram.group(2)) if ram else None,
        swap_used_mb=int(swap.group(1)) if swap else None,
        cpu_percent=tuple(c[0] for c in cores), cpu_mhz=tuple(c[1] for c in cores),
        gpu_percent=float(gr3d.group(1)) if gr3d and gr3d.group(1) else None,
        gpu_mhz=tuple(int(f) for f in gr3d.group(2).split(",") if f) if gr3d and gr3d.group(2) else (),
        temperatures_c=temps, power_mw=power)


@dataclass(frozen=True)
class Stat:
    mean: float
    max: float
    min: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(sum(values) / len(values), max(values), min(values), len(values))

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": round(self.mean, 3), "max": round(self.max, 3), "min": round(self.min, 3),
                "samples": self.samples}


@dataclass(frozen=True)
class TegrastatsSummary:
    """Mean / max / min per power rail (mW) and temperature sensor (°C) over a window, plus GPU load and RAM."""

    samples: int
    seconds: float
    power_mw: dict[str, Stat]
    temperature_c: dict[str, Stat]
    gpu_percent: Stat | None
    ram_used_mb: Stat | None

    def to_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "seconds": round(self.seconds, 3),
                "power_mw": {k: v.to_dict() for k, v in self.power_mw.items()},
                "temperature_c": {k: v.to_dict() for k, v in self.temperature_c.items()},
                "gpu_percent": self.gpu_percent.to_dict() if self.gpu_percent else None,
                "ram_used_mb": self.ram_used_mb.to_dict() if self.ram_used_mb else None}

    def table(self) -> str:
        rows = [f"tegrastats {self.samples} samples over {self.seconds:.1f} s"]
        rows += [f"  {name:<18} mean {s.mean / 1e3:7.2f} W   max {s.max / 1e3:7.2f} W"
                 for name, s in self.power_mw.items()]
        rows += [f"  {name:<18} mean {s.mean:7.1f} C   max {s.max:7.1f} C" for name, s in self.temperature_c.items()]
        if self.gpu_percent is not None:
            rows.append(f"  {'GPU load':<18} mean {self.gpu_percent.mean:7.1f} %   max {self.gpu_percent.max:7.1f} %")
        return "\n".join(rows)


def summarize(samples: Iterable[TegrastatsSample], seconds: float = math.nan) -> TegrastatsSummary:
    samples = list(samples)

    def per_key(get: Callable[[TegrastatsSample], dict[str, float] | dict[str, int]]) -> dict[str, Stat]:
        keys = list(dict.fromkeys(k for s in samples for k in get(s)))
        return {k: Stat.of([float(get(s)[k]) for s in samples if k in get(s)]) for k in keys}

    gpu = [s.gpu_percent for s in samples if s.gpu_percent is not None]
    ram = [float(s.ram_used_mb) for s in samples if s.ram_used_mb is not None]
    return TegrastatsSummary(len(samples), seconds, per_key(lambda s: s.power_mw),
                             per_key(lambda s: s.temperatures_c), Stat.of(gpu) if gpu else None,
                             Stat.of(ram) if ram else None)


class TegrastatsRecorder:
    """Runs ``tegrastats --interval MS`` (or ``command``) as a child process; a thread parses its lines with the
    monotonic time they arrived. ``summary(start, end)`` summarises any window; use as a context manager."""

    def __init__(self, interval_ms: int = 100, *, command: Sequence[str] | None = None,
                 executable: str = "tegrastats", clock: Callable[[], float] = time.monotonic) -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        self.command = list(command) if command is not None else [executable, "--interval", str(interval_ms)]
        self.clock = clock
        self.records: list[tuple[float, TegrastatsSample]] = []
        self.unparsed = 0
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def available(executable: str = "tegrastats") -> bool:
        return shutil.which(executable) is not None

    def start(self) -> TegrastatsRecorder:
        if self._process is not None:
            raise TegrastatsError("the recorder is already running")
        try:
            self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             stdin=subprocess.DEVNULL, text=True, bufsize=1)
        except FileNotFoundError:
            raise TegrastatsMissingError(f"{self.command[0]} not found: tegrastats runs on a Jetson only") from None
        self._thread = threading.Thread(target=self._read, args=(self._process,), name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if not line.strip():
                continue
            now = self.clock()
            try:
                sample = parse_line(line)
            except TegrastatsError:
                self.unparsed += 1
                continue
            with self._lock:
                self.records.append((now, sample))

    def stop(self) -> None:
        """Stop the child (terminate, then kill after 5 s) and wait for the reader to drain its output."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> TegrastatsRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_sample(self, timeout: float = 5.0) -> bool:
        """Block until the first line has been parsed (tegrastats prints after one interval); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.records:
                    return True
            if self._process is None or self._process.poll() is not None:
                break
            time.sleep(0.01)
        with self._lock:
            return bool(self.records)

    def samples(self, start: float | None = None, end: float | None = None) -> list[TegrastatsSample]:
        with self._lock:
            return [s for t, s in self.records if (start is None or t >= start) and (end is None or t <= end)]

    def summary(self, start: float | None = None, end: float | None = None) -> TegrastatsSummary:
        chosen = self.samples(start, end)
        with self._lock:
            times = [t for t, _ in self.records if (start is None or t >= start) and (end is None or t <= end)]
        seconds = (end if end is not None else (times[-1] if times else 0.0)) - \
                  (start if start is not None else (times[0] if times else 0.0))
        return summarize(chosen, seconds)
