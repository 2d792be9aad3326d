"""Refuse up front a stage that cannot fit this machine's memory, instead of being killed by the kernel halfway.

The need is estimated from the checkpoint's parameter count (safetensors headers only, no weight read) times the
bytes per parameter of the dtype the stage holds the model in, times the stage's peak factor, plus the runtime's
own footprint. Factors come from measured peaks (docs/model-sizes.md): loading reads tensor by tensor into the model
(1.25x on a 0.5B checkpoint); the ONNX export holds the model in the checkpoint's dtype (bf16 / fp16 checkpoints;
float32 for float32 ones and for ``--recipe fp8``, whose calibration runs the model in float32) while
``torch.onnx.export`` traces it: a traced graph under protobuf's 2 GB limit is serialized whole (the model, torch's
constant-folded copy of the weights and the serialized model: ~4x), a bigger one streams its weights to files (~1.9x);
widening a bf16 trace to float32 streams one tensor at a time and adds nothing to the peak. A TensorRT build runs
after the model is freed and holds the parser's and the builder's copies of the graph's weights: 2.3x the float32
weight bytes measured at 0.5B (fp16 engines, TensorRT-RTX on the CPU) and 3.05x at 1.5B for fp8 (the quantized float32
model, its Q/DQ export, then the build); 3.0x here, whatever dtype the model was
traced in. Quantizing holds the float32 model, modelopt's quantizer state and the calibration forwards' activations:
1.1x the float32 weights plus 2.4 GB (measured: 1.5B 1.16-1.48x, 3B 1.07x).

``BLOCKPILOT_MEMORY_AVAILABLE`` (bytes) overrides what ``/proc/meminfo`` reports as available (tests, or to leave
room for other work); ``0`` disables the check.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

AVAILABLE_ENV = "BLOCKPILOT_MEMORY_AVAILABLE"
RUNTIME_BYTES = 600 << 20  # python + torch + onnx imported, before any weight
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Peak resident bytes per byte of the model held in the stage's dtype ("export": a graph serialized inline).
STAGE_FACTORS = {"load": 1.3, "export": 4.1, "engines": 3.0, "quantize": 1.1}
# Bytes a stage needs beyond its factor, whatever the model's size: quantize's calibration forwards (logits over the
# whole vocabulary for every packed token) and modelopt's state; 1.5B fp8 measured 9.16 GB = 1.48x, 3B 16.05 GB = 1.07x.
STAGE_EXTRA = {"quantize": 2_400_000_000}
# Export of a model whose traced weights exceed protobuf's 2 GB: torch writes them to files as it serializes.
# Measured (bench scale, peak RSS less the runtime, over the held bytes): 0.5B 4.0x (bf16: 4.28 GiB; fp32: 8.02 GiB),
# 1.5B 1.9x (bf16: 5.97 GiB) and 1.5x (fp32: 9.4 GiB).
EXPORT_EXTERNAL_FACTOR = 1.9
PROTOBUF_LIMIT = 2 << 30
GRAPH_STAGES = ("engines",)  # work on the float32 graphs: 4 bytes a parameter whatever the model was held in


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
    from .checkpoint import checkpoint_headers

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


def stage_factor(stage: str, held_bytes: int) -> float:
    """The peak factor of ``stage`` over ``held_bytes`` (the model's bytes in the dtype the stage holds it in)."""
    if stage == "export" and held_bytes > PROTOBUF_LIMIT:
        return EXPORT_EXTERNAL_FACTOR
    return STAGE_FACTORS[stage]


def _stage_bytes(params: int, stage: str, dtype: str) -> tuple[int, float]:
    """(bytes per parameter, factor) of ``stage`` for a model of ``params`` held in ``dtype``."""
    per = DTYPE_BYTES["float32"] if stage in GRAPH_STAGES else DTYPE_BYTES[dtype]
    return per, stage_factor(stage, params * per)


def estimate_bytes(checkpoint: str | Path, stages: tuple[str, ...], dtype: str = "float32") -> int:
    """Peak resident bytes of the costliest of ``stages`` for ``checkpoint`` held in ``dtype``."""
    params = checkpoint_parameters(checkpoint)
    return int(RUNTIME_BYTES + max(per * factor * params + STAGE_EXTRA.get(s, 0)
                                   for s, (per, factor) in ((s, _stage_bytes(params, s, dtype)) for s in stages)))


def check_fits(checkpoint: str | Path, stages: tuple[str, ...], dtype: str = "float32",
               what: str | None = None, also: tuple[int, str] | None = None) -> int | None:
    """Raise :class:`MemoryBudgetError` when ``stages`` of ``checkpoint`` would not fit the memory available now;
    return the estimate (``None`` when the available memory is unknown or the check is disabled). ``also``:
    ``(bytes, what they are)`` held at the same time (e.g. an ONNX Runtime session next to the torch model)."""
    unknown = [s for s in stages if s not in STAGE_FACTORS]
    if unknown or dtype not in DTYPE_BYTES:
        raise ValueError(f"memory estimate: unknown stage(s) {unknown} or dtype {dtype!r}")
    available = available_bytes()
    if not available:
        return None
    need = estimate_bytes(checkpoint, stages, dtype) + (also[0] if also else 0)
    if need > available:
        params = checkpoint_parameters(checkpoint)
        def need_of(s: str) -> float:
            per, factor = _stage_bytes(params, s, dtype)
            return per * factor * params + STAGE_EXTRA.get(s, 0)

        stage = max(stages, key=need_of)
        per, factor = _stage_bytes(params, stage, dtype)
        held = "float32" if stage in GRAPH_STAGES else dtype
        raise MemoryBudgetError(
            f"{what or ' + '.join(stages)} of {checkpoint} needs about {_gb(need)} of memory ({params / 1e9:.2f} B "
            f"parameters x {per} bytes ({held}) x {factor} for {stage}"
            f"{f' + {_gb(STAGE_EXTRA[stage])}' if stage in STAGE_EXTRA else ''}"
            f"{f', plus {_gb(also[0])} for {also[1]}' if also else ''}, plus "
            f"{_gb(RUNTIME_BYTES)} runtime), but only {_gb(available)} is available here "
            f"({'$' + AVAILABLE_ENV if os.environ.get(AVAILABLE_ENV) else 'MemAvailable'}); refusing before "
            "starting rather than being killed halfway")
    return need
