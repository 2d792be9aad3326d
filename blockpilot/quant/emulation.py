"""NVFP4 fake quantization on CPU, plugged in where Model Optimizer dispatches it.

Model Optimizer 0.47 fake-quantizes dynamic block formats through the custom operator
``tensorrt::dynamic_block_quantize_op`` (registered with ``torch.library`` for the CPU and CUDA
dispatch keys). For NVFP4 (E2M1 values, E4M3 per-block scales, blocks of 16) its implementation
needs a CUDA tensor, so ``mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, ...)`` fails on a CPU-only
host. :func:`enable_cpu_nvfp4_emulation` registers a CPU kernel for that operator which computes
the NVFP4 case with modelopt's own pure-torch reference (``NVFP4QTensor.quantize`` then
``dequantize``) and hands every other case back to modelopt's original implementation. The CUDA
kernel is left registered as it was.

The two-level scaling follows modelopt's kernels: the global scale is
``amax / (6 * 448)``, each block of 16 gets the E4M3-rounded scale ``block_amax / (6 * global)``
and its values round to the nearest E2M1 magnitude (ties to even). ``NVFP4QTensor`` is also what
modelopt's export writes NVFP4 weights with. Known differences from the CUDA fake-quant kernel
are confined to near-empty blocks: the kernel zeroes a block whose quantized scale falls below
1e-5 (absolute) or underflows E4M3 (block amax under about ``amax * 2e-6``), where this path
keeps the smallest E4M3 scale; such blocks only hold values below 6e-5 or ``amax * 2e-6``. Verify against the
CUDA kernel when a GPU is available: :func:`compare_with_cuda` returns the largest difference
between the two paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
# The operator's integer encoding of NVFP4: E2M1 -> num_bits 4 with 2 exponent bits; E4M3 scales -> 8 and 4.
NVFP4_OP_ARGS = (4, 2, 8, 4)
_MIN_GLOBAL_SCALE = 1e-12  # the CUDA kernel's guard against an all-zero calibration

_OP = "dynamic_block_quantize_op"
_OVERLOAD = "dynamic_block_quantize_op.overload"
_lib: torch.library.Library | None = None  # kept alive: dropping it would unregister the CPU kernels


def _is_nvfp4(num_bits: int, exponent_bits: int, scale_num_bits: int, scale_exponent_bits: int) -> bool:
    return (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == NVFP4_OP_ARGS


def nvfp4_fake_quantize(inputs: torch.Tensor, global_amax: torch.Tensor | float,
                        block_size: int = NVFP4_BLOCK) -> torch.Tensor:
    """``inputs`` rounded to NVFP4 and back, in its own dtype and shape (blocks along the last dim).

    ``global_amax`` is the tensor-wide absolute maximum the quantizer calibrated (several values
    reduce to their maximum, as modelopt does). A last dimension that is not a multiple of the
    block is zero-padded for the rounding and cut back afterwards.
    """
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    amax = torch.as_tensor(global_amax, dtype=torch.float32, device=inputs.device).detach().amax()
    scale_2 = (amax / (E2M1_MAX * E4M3_MAX)).clamp(min=_MIN_GLOBAL_SCALE)
    width = inputs.shape[-1] if inputs.dim() else 1
    x = inputs.reshape(-1, width) if inputs.dim() < 2 else inputs.contiguous()
    pad = (-width) % block_size
    if pad:
        x = F.pad(x, (0, pad))
    qtensor, block_scale, scale_2 = NVFP4QTensor.quantize(x, block_size, weights_scaling_factor_2=scale_2)
    out = qtensor.dequantize(inputs.dtype, scale=block_scale, double_scale=scale_2, block_sizes={-1: block_size})
    if pad:
        out = out[..., :width]
    return out.reshape(inputs.shape).contiguous()


def _original_kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor] | None]:
    from modelopt.torch.quantization import tensor_quant

    with_amax = tensor_quant._dynamic_block_quantize_impl
    without_amax = getattr(tensor_quant, "_dynamic_block_quantize_impl_none_amax", None)
    return with_amax, without_amax


def _cpu_kernel(original: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    def kernel(inputs: torch.Tensor, block_size: int, amax: torch.Tensor | None, num_bits: int, exponent_bits: int,
               scale_num_bits: int, scale_exponent_bits: int) -> torch.Tensor:
        if _is_nvfp4(num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
            # Without a calibrated amax, NVFP4 scales by the tensor's own maximum.
            global_amax = amax if amax is not None else inputs.detach().abs().amax()
            return nvfp4_fake_quantize(inputs, global_amax, block_size)
        if original is None:
            raise NotImplementedError(f"tensorrt::{_OVERLOAD} has no modelopt kernel to defer to")
        return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    return kernel


def enable_cpu_nvfp4_emulation() -> None:
    """Register the CPU NVFP4 kernel for ``tensorrt::dynamic_block_quantize_op`` (idempotent).

    Raises ``RuntimeError`` when modelopt could not register its operators with ``torch.library``
    (then there is no dispatcher entry to extend).
    """
    global _lib
    if _lib is not None:
        return
    import modelopt.torch.quantization  # noqa: F401  (defines the tensorrt:: operators)

    packet: Any = getattr(torch.ops.tensorrt, _OP, None)
    if packet is None:
        raise RuntimeError(f"modelopt did not register tensorrt::{_OP} with torch.library; "
                           "NVFP4 cannot be emulated on CPU")
    with_amax, without_amax = _original_kernels()
    lib = torch.library.Library("tensorrt", "IMPL")
    with warnings.catch_warnings():
        # Replacing modelopt's CPU kernel is the point; torch says so once per process.
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel",
                                category=UserWarning)
        lib.impl(_OP, _cpu_kernel(with_amax), "CPU")
        if "overload" in packet.overloads():
            lib.impl(_OVERLOAD, _cpu_kernel(without_amax), "CPU")
    _lib = lib


def emulation_active() -> bool:
    """Whether NVFP4 fake quantization on CPU tensors runs through this module ("NVFP4 emulated on CPU")."""
    return _lib is not None


def compare_with_cuda(tensor: torch.Tensor, block_size: int = NVFP4_BLOCK) -> float | None:
    """Largest absolute difference between the CPU emulation and modelopt's CUDA NVFP4 path on
    ``tensor`` (its own amax as the global amax); ``None`` without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    enable_cpu_nvfp4_emulation()
    x = tensor.detach().float().cpu()
    amax = x.abs().amax()
    emulated = torch.ops.tensorrt.dynamic_block_quantize_op(x, block_size, amax, *NVFP4_OP_ARGS)
    on_gpu = torch.ops.tensorrt.dynamic_block_quantize_op(x.cuda(), block_size, amax.cuda(), *NVFP4_OP_ARGS)
    return float((emulated - on_gpu.cpu()).abs().max())
