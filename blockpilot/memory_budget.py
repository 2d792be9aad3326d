"""Refuse up front a stage that cannot fit this machine's memory, instead of being killed by the kernel halfway.

The need is estimated from the checkpoint's parameter count (safetensors headers only, no weight read) times the
bytes per parameter of the dtype the stage holds the model in, times the stage's peak factor, plus the runtime's
own footprint. Factors come from measured peaks (docs/model-sizes.md): loading reads tensor by tensor into the model
(1.25x on a 0.5B checkpoint); the ONNX export holds the model, the traced graph's initializers and their
serialization; a TensorRT build holds the graph, the fp16 rewrite and the builder's copy of the weights.

``BLOCKPILOT_MEMORY_AVAILABLE`` (bytes) overrides what ``/proc/meminfo`` reports as available (tests, or to leave
room for other work); ``0`` disables the check.
"""

from __future__ import annotations

import os
from pathlib import Path

from .vla.checkpoint import CheckpointError

AVAILABLE_ENV = "BLOCKPILOT_MEMORY_AVAILABLE"
RUNTIME_BYTES = 600 << 20  # python + torch + onnx imported, before any weight
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Peak resident bytes per byte of the model held in the stage's dtype.
STAGE_FACTORS = {"load": 1.3, "export": 3.5, "engines": 8.0, "quantize": 2.5}


class MemoryBudgetError(CheckpointError):
    """A stage needs more memory than this machine has available; names both, and what the need is made of (a
    :class:`CheckpointError`: the checkpoint does not fit here, reported by every command)."""


def available_bytes() -> int | None:
    """Memory available to a new allocation: ``BLOCKPILOT_MEMORY_AVAILABLE``, else ``MemAvailable`` of
    /proc/meminfo; ``None`` where neither is known (the check is skipped)."""
    raw = os.environ.get(AVAILABLE_ENV)
    if raw:
        try:
            return int(raw)
        except ValueError as exc:
            raise MemoryBudgetError(f"{AVAILABLE_ENV}={raw!r}: expected a byte count") from exc
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def checkpoint_parameters(checkpoint: str | Path) -> int:
    """Parameters stored in a checkpoint's safetensors files, from their headers."""
    from .vla.checkpoint import checkpoint_headers

    total = 0
    for _, entries in checkpoint_headers(checkpoint):
        for entry in entries:
            count = 1
            for d in entry.shape:
                count *= d
            total += count
    return total


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def estimate_bytes(checkpoint: str | Path, stages: tuple[str, ...], dtype: str = "float32") -> int:
    """Peak resident bytes of the costliest of ``stages`` for ``checkpoint`` held in ``dtype``."""
    weights = checkpoint_parameters(checkpoint) * DTYPE_BYTES[dtype]
    return int(RUNTIME_BYTES + weights * max(STAGE_FACTORS[s] for s in stages))


def check_fits(checkpoint: str | Path, stages: tuple[str, ...], dtype: str = "float32",
               what: str | None = None) -> int | None:
    """Raise :class:`MemoryBudgetError` when ``stages`` of ``checkpoint`` would not fit the memory available now;
    return the estimate (``None`` when the available memory is unknown or the check is disabled)."""
    unknown = [s for s in stages if s not in STAGE_FACTORS]
    if unknown or dtype not in DTYPE_BYTES:
        raise ValueError(f"memory estimate: unknown stage(s) {unknown} or dtype {dtype!r}")
    available = available_bytes()
    if not available:
        return None
    need = estimate_bytes(checkpoint, stages, dtype)
    if need > available:
        params = checkpoint_parameters(checkpoint)
        stage = max(stages, key=lambda s: STAGE_FACTORS[s])
        raise MemoryBudgetError(
            f"{what or ' + '.join(stages)} of {checkpoint} needs about {_gb(need)} of memory ({params / 1e9:.2f} B "
            f"parameters x {DTYPE_BYTES[dtype]} bytes ({dtype}) x {STAGE_FACTORS[stage]} for {stage}, plus "
            f"{_gb(RUNTIME_BYTES)} runtime), but only {_gb(available)} is available here "
            f"({'$' + AVAILABLE_ENV if os.environ.get(AVAILABLE_ENV) else 'MemAvailable'}); refusing before "
            "starting rather than being killed halfway")
    return need
