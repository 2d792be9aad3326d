"""The dtype the torch backend loads and plans a checkpoint in: ``auto`` or a named one.

``auto`` is the dtype the checkpoint's weights are stored in, read from the safetensors headers (no weight is
read): a bf16 checkpoint (the published Fast_dLLM_v2 / Fast-dVLM / Fast-dDrive ones) plans in bfloat16 as their own
``generate`` does, an fp32 one (the reference model) in float32. Where a checkpoint mixes floating dtypes the widest
wins: float32 when any tensor is float32 or float64, or when bfloat16 and float16 tensors are both present (neither
holds the other). Buffers the loader recomputes (``rotary_emb.inv_freq``, often stored in float32 beside bf16
weights) do not count.

A dtype is also checked to run on the device before gigabytes of weights are read: a bf16 request on a CUDA GPU
without native bf16 is refused, and a tiny linear, attention and softmax are run in it once per (dtype, device).
The module imports torch only when it resolves or checks a dtype, so command-line parsers can use its names.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from ..errors import BlockpilotError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
_STORED = {"float64": "float32", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_dtype_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--dtype`` of a command that loads a checkpoint on the torch backend."""
    parser.add_argument("--dtype", default=default, choices=DTYPE_CHOICES,
                        help="dtype the checkpoint is loaded and planned in on the torch backend: auto (the dtype its "
                             "weights are stored in: bfloat16 for the published Fast_dLLM_v2 / Fast-dVLM checkpoints, "
                             f"float32 for the reference model), float32, bfloat16, float16 (default: {default})")


class DtypeError(BlockpilotError, ValueError):
    """A dtype that is not one the torch backend plans in, or that the device cannot run; the message names the
    option (``--dtype`` on the command line, ``dtype`` elsewhere) and the value."""


def stored_dtype(checkpoint_dir: str | Path) -> str:
    """The dtype ``auto`` resolves to for ``checkpoint_dir``: its weights' stored dtype (the widest if mixed)."""
    from .checkpoint import IGNORED, CheckpointError, checkpoint_headers

    found: set[str] = set()
    for _, entries in checkpoint_headers(checkpoint_dir):
        found.update(str(e.dtype).removeprefix("torch.") for e in entries
                     if e.dtype.is_floating_point and not IGNORED.search(e.name))
    if not found:
        raise CheckpointError(f"{checkpoint_dir}: no floating-point tensor in the checkpoint to take a dtype from")
    names = {_STORED.get(d, "float32") for d in found}  # float8 and others: compute in float32
    if "float32" in names or len(names) > 1:
        return "float32"
    return names.pop()


def check_dtype_name(dtype: str, option: str = "dtype") -> None:
    if dtype not in DTYPE_CHOICES:
        raise DtypeError(f"{option} {dtype!r}: the dtype must be one of {', '.join(DTYPE_CHOICES)} (auto: the "
                         "dtype the checkpoint's weights are stored in)")


def resolve_dtype(checkpoint_dir: str | Path, dtype: str, device: str = "cpu", option: str = "dtype") -> str:
    """``dtype`` (``auto`` resolved against the checkpoint's headers), checked to run on ``device``; raises
    :class:`DtypeError` naming ``option`` otherwise."""
    check_dtype_name(dtype, option)
    resolved = stored_dtype(checkpoint_dir) if dtype == "auto" else dtype
    what = f"{option} auto (the checkpoint's {resolved})" if dtype == "auto" else f"{option} {resolved}"
    reason = _cannot_run(resolved, device)
    if reason is not None:
        raise DtypeError(f"{what}: device {device!r} cannot run it ({reason}); choose another {option}")
    return resolved


# CPU flags of native 16-bit matmuls. Without them oneDNN emulates: measured on this project's Xeon with oneDNN capped
# (ONEDNN_MAX_CPU_ISA), a 0.5B bf16 block step took 1.06 s (AVX-512 without BF16) and 1.72 s (AVX2) against 0.50 s
# in float32 and 0.20 s with AMX-BF16 (docs/model-sizes.md).
_NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "avx_ne_convert"), "float16": ("avx512_fp16", "amx_fp16")}


def slow_dtype_note(dtype: str, device: str = "cpu", cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """A note where ``dtype`` on ``device`` is likely slower than float32: a CPU whose flags (``cpuinfo``) show no
    native matmul for it; ``None`` otherwise, or where the flags cannot be read."""
    if dtype not in _NATIVE_FLAGS or not device.startswith("cpu"):
        return None
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None or any(f in flags for f in _NATIVE_FLAGS[dtype]):
        return None
    return (f"this CPU has none of {', '.join(_NATIVE_FLAGS[dtype])}: {dtype} matmuls are emulated and a block step "
            "may take 2-3.5x as long as in float32 (at half the memory); --dtype float32 is faster here")


def _cannot_run(dtype: str, device: str) -> str | None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return str(exc)
    if dev.type == "cuda" and torch.cuda.is_available() and dtype == "bfloat16" \
            and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(dev)} has no native bfloat16"
    return _probe(dtype, str(dev))


@functools.cache
def _probe(dtype: str, device: str) -> str | None:
    """``None`` when a linear, an attention and a softmax run in ``dtype`` on ``device``, else why not."""
    import torch

    dt = getattr(torch, dtype)
    try:
        x = torch.ones(1, 2, 4, 8, dtype=dt, device=device)
        y = torch.nn.functional.linear(x, torch.ones(8, 8, dtype=dt, device=device))
        mask = torch.ones(4, 4, dtype=torch.bool, device=device)
        y = torch.nn.functional.scaled_dot_product_attention(y, y, y, attn_mask=mask).softmax(-1)
        return None if bool(torch.isfinite(y).all()) else "non-finite results"
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
