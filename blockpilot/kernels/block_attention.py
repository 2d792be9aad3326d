"""Block-diffusion attention of one LM step as a Triton kernel (TensorRT plugin and GPU fast path).

:func:`block_diffusion_attention` computes what :func:`blockpilot.kernels.reference.block_diffusion_attention_ref`
does, as one flash-attention style pass: the grid is ``(query head, query tile)``; each program loads its tile
of queries once, walks the key tiles of its K/V head (``head // (H // Hkv)``) up to the last key any of its
queries may see, masks each score tile by slot index for the mode, and keeps an online softmax (running max
and sum) in float32. Nothing of size ``T x key_end`` is ever materialised.

``start``, ``key_end`` and ``mode`` are read by the kernel from device memory (one-element integer tensors),
so a caller whose values live on the device (the TensorRT plugin: they are tensors of the engine) launches
without a device-to-host sync; Python ints are accepted too and checked on the host.

:func:`write_window_` writes the window's K or V into a cache in place, reading ``start`` the same way.

Without a GPU, set ``TRITON_INTERPRET=1`` before this module (or ``triton``) is first imported: the kernels
then run in Triton's interpreter on CPU tensors (slow; for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import IntLike, as_int, check_shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


@triton.jit
def _block_attention_kernel(Q, K, V, OUT, START, KEY_END, MODE,
                            stride_qh, stride_qt, stride_kh, stride_kc, stride_vh, stride_vc, stride_oh, stride_ot,
                            T, CAPACITY, HEAD_DIM, GROUPS, BLOCK_SIZE, qk_scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            IEEE: tl.constexpr):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = head // GROUPS
    start = tl.load(START).to(tl.int32)
    key_end = tl.minimum(tl.load(KEY_END).to(tl.int32), CAPACITY)
    mode = tl.load(MODE).to(tl.int32)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_slot = start + offs_m

    # The last key any query of this tile may see: later key tiles are skipped, not masked.
    last_q = start + tl.minimum(tile * BLOCK_M + BLOCK_M, T) - 1
    causal_end = tl.minimum(key_end, last_q + 1)
    block_end = tl.minimum(key_end, (last_q // BLOCK_SIZE + 1) * BLOCK_SIZE)
    hi = tl.where(mode == 0, causal_end, tl.where(mode == 1, block_end, key_end))

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kc + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") if IEEE else tl.dot(q, tl.trans(k))
        s = s * qk_scale  # log2 units: exp2 below
        causal = offs_n[None, :] <= q_slot[:, None]
        block = (offs_n[None, :] // BLOCK_SIZE) <= (q_slot[:, None] // BLOCK_SIZE)
        allowed = ((mode == 0) & causal) | ((mode == 1) & block) | (mode == 2)
        allowed = allowed & key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet stays at zero
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vc + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee") if IEEE else tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(OUT + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _write_window_kernel(NEW, CACHE, START, stride_nh, stride_nt, stride_ch, stride_cc, T, CAPACITY, HEAD_DIM,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(START).to(tl.int32) + offs_t
    ok = ((offs_t < T) & (slot >= 0) & (slot < CAPACITY))[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(NEW + head * stride_nh + offs_t[:, None] * stride_nt + offs_d[None, :], mask=ok, other=0.0)
    tl.store(CACHE + head * stride_ch + slot[:, None] * stride_cc + offs_d[None, :], x.to(CACHE.dtype.element_ty),
             mask=ok)


def _device_scalar(value: IntLike, name: str, device: torch.device) -> torch.Tensor:
    """A one-element integer tensor on ``device`` (a Python int becomes an int32 tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a one-element int32/int64 tensor, got {value.dtype} "
                             f"{tuple(value.shape)}")
        return value.to(device).reshape(1)
    return torch.tensor([int(value)], dtype=torch.int32, device=device)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def block_diffusion_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: IntLike,
                              key_end: IntLike, mode: IntLike, block_size: int, scale: float,
                              out: torch.Tensor | None = None, *, block_m: int | None = None,
                              block_n: int | None = None) -> torch.Tensor:
    """Attention of the window's queries over the cache slots ``[0, key_end)`` allowed by ``mode``.

    ``q``: ``(1, H, T, D)``; ``k_cache`` / ``v_cache``: ``(1, Hkv, C, D)`` already holding the window at slots
    ``start .. start + T - 1`` (:func:`write_window_`); all float16, bfloat16 or float32, one dtype, on one
    device, the last dim contiguous (other strides free). ``H`` must be a multiple of ``Hkv``.
    ``start``, ``key_end``, ``mode`` (0 causal, 1 block, 2 bidirectional): Python ints (checked here) or
    one-element int32/int64 tensors on the device (read by the kernel; the caller guarantees
    ``0 <= start``, ``key_end <= C``, a valid mode; ``key_end`` is clamped to ``C``). ``block_size`` > 0.
    ``scale`` multiplies ``q . k`` before the softmax. Scores, softmax and the weighted sum run in float32;
    with float32 inputs the dots are exact IEEE (no TF32).

    Returns ``out`` (allocated like ``q`` when ``None``; any float dtype, shape ``(1, H, T, D)``). A query that
    sees no key gets zeros. ``block_m`` / ``block_n`` override the query / key tile sizes (powers of two >= 16).
    """
    heads, kv_heads, t, capacity, head_dim = check_shapes(q, k_cache, v_cache)
    if q.dtype not in FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share one of {FLOAT_DTYPES}, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not isinstance(start, torch.Tensor) and not isinstance(key_end, torch.Tensor):
        s, e = as_int(start, "start"), as_int(key_end, "key_end")
        if s < 0 or not 0 <= e <= capacity:
            raise ValueError(f"need start >= 0 and 0 <= key_end <= capacity {capacity}, got {s}, {e}")
    if not isinstance(mode, torch.Tensor) and as_int(mode, "mode") not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (causal), 1 (block) or 2 (bidirectional), got {mode}")
    if out is None:
        out = torch.empty_like(q)
    elif tuple(out.shape) != tuple(q.shape) or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} on {q.device} with a contiguous last dim, got "
                         f"{tuple(out.shape)} on {out.device}")
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    device = q.device
    start_t, end_t, mode_t = (_device_scalar(v, n, device) for v, n in ((start, "start"), (key_end, "key_end"),
                                                                         (mode, "mode")))
    bm = block_m or min(64, _pow2(t))
    bn = block_n or 32
    for name, size in (("block_m", bm), ("block_n", bn)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    grid = (heads, triton.cdiv(t, bm))
    _block_attention_kernel[grid](
        q, k_cache, v_cache, out, start_t, end_t, mode_t,
        q.stride(1), q.stride(2), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        out.stride(1), out.stride(2),
        t, capacity, head_dim, heads // kv_heads, block_size, float(scale) * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(head_dim), IEEE=q.dtype == torch.float32,
    )
    return out


def write_window_(cache: torch.Tensor, new: torch.Tensor, start: IntLike) -> torch.Tensor:
    """Write ``new`` ``(1, Hkv, T, D)`` into ``cache`` ``(1, Hkv, C, D)`` at slots ``start ..`` in place (cast to
    the cache's dtype; slots past ``C`` are dropped); returns ``cache``. ``start`` as for
    :func:`block_diffusion_attention`."""
    if cache.dim() != 4 or new.dim() != 4 or cache.shape[:2] != new.shape[:2] or cache.shape[3] != new.shape[3]:
        raise ValueError(f"window {tuple(new.shape)} does not fit cache {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError("cache must have a contiguous last dim (it is written in place)")
    kv_heads, t, head_dim = new.shape[1], new.shape[2], new.shape[3]
    capacity = cache.shape[2]
    if not isinstance(start, torch.Tensor) and not 0 <= as_int(start, "start") <= capacity - t:
        raise ValueError(f"window slots {start}..{as_int(start, 'start') + t - 1} fall outside capacity {capacity}")
    new = _last_dim_contiguous(new)
    start_t = _device_scalar(start, "start", cache.device)
    bt = min(64, _pow2(t))
    _write_window_kernel[(kv_heads, triton.cdiv(t, bt))](
        new, cache, start_t, new.stride(1), new.stride(2), cache.stride(1), cache.stride(2), t, capacity, head_dim,
        BLOCK_T=bt, BLOCK_D=_pow2(head_dim),
    )
    return cache
