"""Per-tensor FP8 (e4m3) quantization of a linear's activation rows in two Triton kernels.

:func:`quantize_rows` replaces the dozen small torch ops that quantized the input of every
:class:`~blockpilot.runtime.cuda_fp8.Fp8Linear` call (abs, amax, the scale rule, multiply, clamp, cast, pad,
the scale tensor for ``torch._scaled_mm``), which at batch one cost more launches than the GEMM saved. With a
dynamic scale, one program per row writes the row's max-abs to a float32 buffer; then one program per padded
row reduces those to the tensor's ``amax``, applies modelopt's rule (``quant = 448 / amax``, ``amax <= 2**-24``
counting as 1), quantizes its row (zeros past the last row) and writes its row of the dequant scale. A static
scale skips the first kernel. No host sync, so the pair can be captured in a CUDA graph.

The arithmetic is the torch path's to the bit, :func:`~blockpilot.kernels.reference.quantize_rows_ref`:
``448 / amax`` in torch is ``amax.reciprocal() * 448`` (two roundings, ``Tensor.__rtruediv__``), so the
kernel does the same with IEEE divisions (``tl.div_rn``; Triton's ``/`` is an approximate division on NVIDIA
GPUs). NaNs propagate through the max and the clamp as they do in torch. Without a GPU, set
``TRITON_INTERPRET=1`` before ``triton`` is imported; the interpreter's float32 -> float8 cast rounds wrongly
(ties away from zero, a mantissa carry is dropped, subnormals truncate), so tests check the float32 values
before the cast there and the bytes on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import E4M3, padded_rows

AMAX_CHUNK = 1024  # row amaxes per load in the global reduction
MAX_BLOCK_K = 1024  # row elements per load
_FP8_MAX = tl.constexpr(448.0)
_TINY_AMAX = tl.constexpr(2.0**-24)  # an amax at or below this counts as 1


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_amax_kernel(X, ROWS, AMAX, K, stride_x, stride_rows, HAS_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    base = X + row.to(tl.int64) * stride_x
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(base + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc = _max_nan(acc, tl.abs(x))
    amax = tl.reduce(acc, 0, _max_nan)
    if HAS_ROWS:  # max(|x| * w) == max(|x|) * w for w >= 0 (rounding is monotone)
        amax = amax * tl.load(ROWS + row * stride_rows).to(tl.float32)
    tl.store(AMAX + row, amax)


@triton.jit
def _quantize_kernel(X, AMAX, QUANT, XQ, DEQUANT, M, K, stride_x, stride_q, STATIC: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    if STATIC:
        quant = tl.load(QUANT).to(tl.float32)
    else:
        acc = tl.zeros((CHUNK,), tl.float32)
        for m0 in range(0, M, CHUNK):
            offs = m0 + tl.arange(0, CHUNK)
            acc = _max_nan(acc, tl.load(AMAX + offs, mask=offs < M, other=0.0))
        amax = tl.reduce(acc, 0, _max_nan)
        safe = tl.where(amax <= _TINY_AMAX, 1.0, amax)
        quant = tl.div_rn(1.0, safe) * _FP8_MAX
    tl.store(DEQUANT + row, tl.div_rn(1.0, quant))
    src = X + row.to(tl.int64) * stride_x
    dst = XQ + row.to(tl.int64) * stride_q
    k_real = tl.where(row < M, K, 0)  # a pad row loads nothing and quantizes zeros
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(src + offs, mask=offs < k_real, other=0.0).to(tl.float32)
        q = tl.clamp(x * quant, -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(dst + offs, q.to(XQ.dtype.element_ty), mask=offs < K)


def _launch(x: torch.Tensor, quant: torch.Tensor | None, rows: torch.Tensor | None, pad_to: int, chunk: int,
            block_k: int | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` into ``out_dtype``: float32 gives the clamped scaled values before the cast."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    m_pad = padded_rows(m, pad_to)
    xq = torch.empty(m_pad, k, dtype=out_dtype, device=x.device)
    dequant = torch.empty(m_pad, 1, dtype=torch.float32, device=x.device)
    if m_pad == 0:
        return xq, dequant
    bk = block_k or min(triton.next_power_of_2(max(k, 1)), MAX_BLOCK_K)
    if quant is not None:
        if quant.numel() != 1:
            raise ValueError(f"quant must hold one scale, got shape {tuple(quant.shape)}")
        quant = quant.reshape(1).to(torch.float32)
        amax = quant  # unused by the static kernel
    else:
        amax = torch.empty(m, dtype=torch.float32, device=x.device)
        if rows is not None and rows.numel() != m:
            raise ValueError(f"rows must hold one weight per row ({m}), got shape {tuple(rows.shape)}")
        flat_rows = x if rows is None else rows.reshape(m)
        if m:
            _row_amax_kernel[(m,)](x, flat_rows, amax, k, x.stride(0), flat_rows.stride(0),
                                   HAS_ROWS=rows is not None, BLOCK_K=bk)
    _quantize_kernel[(m_pad,)](x, amax, amax if quant is None else quant, xq, dequant, m, k, x.stride(0),
                               xq.stride(0), STATIC=quant is not None, CHUNK=chunk, BLOCK_K=bk)
    return xq, dequant


def quantize_rows(x: torch.Tensor, *, quant: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                  pad_to: int = 16, chunk: int = AMAX_CHUNK,
                  block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq (M_pad, K) float8 e4m3, dequant (M_pad, 1) float32)`` of ``x`` ``(M, K)`` (fp16, bf16 or fp32,
    last dim contiguous), ``M_pad`` = ``M`` rounded up to a multiple of ``pad_to``; rows past ``M`` are zeros.

    ``quant``: a static quant scale (one float32 element on the device), else the scale is ``448 / amax(|x|)``
    with ``rows`` ``(M, 1)`` 0/1 weights of the rows that count. Every row of ``dequant`` holds ``1 / quant``:
    the row-wise ``scale_a`` of ``torch._scaled_mm``, and ``dequant[:1].reshape(())`` the per-tensor one.
    ``chunk`` (row amaxes per load, a power of two) and ``block_k`` (elements per load) tune the loops."""
    return _launch(x, quant, rows, pad_to, chunk, block_k, E4M3)

