"""Fused elementwise kernels of the decode forward, so that one layer at batch one is a handful of launches.

At batch one a layer's GEMMs read the weights at close to the memory bandwidth, and the rest of the layer is a
few thousand values per op: written as torch ops (RMSNorm alone is seven kernels, RoPE five per tensor, the cache
write and a draft's save two each) the launches, not the bytes, set the step time. These kernels do the same
arithmetic with the same roundings as :mod:`blockpilot.runtime.cuda_lm`'s torch ops (every intermediate that torch
rounds to the activation dtype is rounded here too; float32 inside), in one launch each:

* :func:`add_rms_norm` -- ``x += delta`` (optional, the residual add) then RMSNorm, both outputs written;
* :func:`rope_write_cache` -- RoPE on the window's q (in place) and k, k and v written into the cache at each
  position's slot, and for a draft the slots' previous contents saved first (:func:`restore_cache` puts them
  back after attention);
* :func:`silu_mul` -- ``silu(gate) * up`` from the fused gate/up projection.

Without a GPU, set ``TRITON_INTERPRET=1`` before ``triton`` is imported to run them on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, DELTA, W, OUT, SUM, stride_x, stride_delta, stride_out, stride_sum, N, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + row * stride_delta + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(SUM + row * stride_sum + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / N
    y = (x32 * (1.0 / tl.sqrt(var + eps))).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(OUT + row * stride_out + offs, (w.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rms_norm(s), s)`` with ``s = x + delta`` (written into ``x`` in place) or ``s = x``.

    ``x``, ``delta``: ``(..., N)`` of one float dtype, last dim contiguous; ``weight`` ``(N,)``. The norm is
    ``weight * (s32 * rsqrt(mean(s32**2) + eps)).to(dtype)`` with ``s32`` the float32 of ``s``, as
    :func:`blockpilot.runtime.cuda_lm.rms_norm`; ``out`` is allocated in the promoted dtype of ``weight`` and
    ``x`` (torch's ``weight * normed``) when ``None``.
    """
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    if flat.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
        raise ValueError("add_rms_norm needs x and delta with a contiguous last dim")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta {tuple(delta.shape)} must have x's shape {tuple(x.shape)}")
    result = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device) \
        if out is None else out
    dflat = flat if delta is None else delta.reshape(-1, n)
    oflat = result.reshape(-1, n)
    if flat.shape[0]:
        _add_rms_norm_kernel[(flat.shape[0],)](
            flat, dflat, weight, oflat, flat, flat.stride(0), dflat.stride(0), oflat.stride(0), flat.stride(0), n,
            float(eps), HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n))
    return result, x


@triton.jit
def _rope_cache_kernel(QKV, COS, SIN, KC, VC, SLOTS, SAVE_K, SAVE_V,
                       stride_qb, stride_qt, stride_cb, stride_ct, stride_kb, stride_kh, stride_ks,
                       stride_sb, stride_sh, stride_st, T, HEADS, KV_HEADS,
                       HALF: tl.constexpr, BLOCK: tl.constexpr, SAVE: tl.constexpr):
    bt = tl.program_id(0)
    head = tl.program_id(1)  # query heads first, then K/V heads
    b = bt // T
    t = bt % T
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    dt = QKV.dtype.element_ty
    rot = COS + b * stride_cb + t * stride_ct
    cos1 = tl.load(rot + offs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(rot + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    rot = SIN + b * stride_cb + t * stride_ct
    sin1 = tl.load(rot + offs, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(rot + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    row = QKV + b * stride_qb + t * stride_qt
    src = row + head * 2 * HALF  # the q heads, then the k heads, are contiguous runs of head_dim
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rounded where torch rounds: each product, then the sum
    o1 = ((x1 * cos1).to(dt).to(tl.float32) + (-x2 * sin1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * cos2).to(dt).to(tl.float32) + (x1 * sin2).to(dt).to(tl.float32)).to(dt)
    if head < HEADS:
        tl.store(src + offs, o1, mask=mask)
        tl.store(src + HALF + offs, o2, mask=mask)
    else:
        kv = head - HEADS
        slot = tl.load(SLOTS + t)
        k_dst = KC + b * stride_kb + kv * stride_kh + slot * stride_ks
        v_dst = VC + b * stride_kb + kv * stride_kh + slot * stride_ks
        v_src = row + (HEADS + KV_HEADS + kv) * 2 * HALF
        if SAVE:
            saved = b * stride_sb + kv * stride_sh + t * stride_st
            tl.store(SAVE_K + saved + offs, tl.load(k_dst + offs, mask=mask), mask=mask)
            tl.store(SAVE_K + saved + HALF + offs, tl.load(k_dst + HALF + offs, mask=mask), mask=mask)
            tl.store(SAVE_V + saved + offs, tl.load(v_dst + offs, mask=mask), mask=mask)
            tl.store(SAVE_V + saved + HALF + offs, tl.load(v_dst + HALF + offs, mask=mask), mask=mask)
        tl.store(k_dst + offs, o1.to(KC.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF + offs, o2.to(KC.dtype.element_ty), mask=mask)
        tl.store(v_dst + offs, tl.load(v_src + offs, mask=mask).to(VC.dtype.element_ty), mask=mask)
        tl.store(v_dst + HALF + offs, tl.load(v_src + HALF + offs, mask=mask).to(VC.dtype.element_ty), mask=mask)


def _check_cache(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                 head_dim: int) -> None:
    b, _, width = qkv.shape
    if width != (heads + 2 * kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be (B, T, {(heads + 2 * kv_heads) * head_dim}) with a contiguous last dim, got "
                         f"{tuple(qkv.shape)}")
    want = (b, kv_heads, head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.shape[0], cache.shape[1], cache.shape[3]) != want or cache.stride(-1) != 1:
            raise ValueError(f"{name} must be (B, {kv_heads}, slots, {head_dim}) with a contiguous last dim, got "
                             f"{tuple(cache.shape)}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share their strides")


def rope_write_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
                     save: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RoPE on the q and k parts of ``qkv`` ``(B, T, (H + 2 Hkv) * D)`` (q rotated in place), k and v written into
    ``k_cache`` / ``v_cache`` ``(B, Hkv, slots, D)`` at ``slots`` ``(T,)``. ``cos`` / ``sin``: ``(B, T, D)`` in the
    activation dtype (:class:`blockpilot.vla.lm.RotaryEmbedding`). ``save``: first copy the cache rows about to be
    overwritten into new ``(B, Hkv, T, D)`` tensors, returned as ``(k, v)`` for :func:`restore_cache`."""
    b, t, _ = qkv.shape
    head_dim = cos.shape[-1]
    _check_cache(qkv, k_cache, v_cache, heads, kv_heads, head_dim)
    if head_dim % 2 or cos.shape != (b, t, head_dim) or sin.shape != cos.shape or cos.stride() != sin.stride() \
            or cos.stride(-1) != 1:
        raise ValueError(f"cos and sin must be (B, T, D) = {(b, t, head_dim)} of one layout, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    saved = None
    if save:
        saved = (torch.empty(b, kv_heads, t, head_dim, dtype=k_cache.dtype, device=k_cache.device),
                 torch.empty(b, kv_heads, t, head_dim, dtype=v_cache.dtype, device=v_cache.device))
    sk, sv = saved if saved is not None else (k_cache, v_cache)
    if b * t:
        _rope_cache_kernel[(b * t, heads + kv_heads)](
            qkv, cos, sin, k_cache, v_cache, slots, sk, sv, qkv.stride(0), qkv.stride(1), cos.stride(0),
            cos.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), sk.stride(0), sk.stride(1),
            sk.stride(2), t, heads, kv_heads, HALF=head_dim // 2, BLOCK=max(16, triton.next_power_of_2(head_dim // 2)),
            SAVE=save)
    return saved


@triton.jit
def _restore_kernel(KC, VC, SLOTS, SAVE_K, SAVE_V, stride_kb, stride_kh, stride_ks, stride_sb, stride_sh, stride_st,
                    T, D, BLOCK: tl.constexpr):
    bt = tl.program_id(0)
    kv = tl.program_id(1)
    b = bt // T
    t = bt % T
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    slot = tl.load(SLOTS + t)
    dst = b * stride_kb + kv * stride_kh + slot * stride_ks
    src = b * stride_sb + kv * stride_sh + t * stride_st
    tl.store(KC + dst + offs, tl.load(SAVE_K + src + offs, mask=mask), mask=mask)
    tl.store(VC + dst + offs, tl.load(SAVE_V + src + offs, mask=mask), mask=mask)


def restore_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  saved: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Put back the cache rows :func:`rope_write_cache` saved (``saved`` ``(B, Hkv, T, D)`` each)."""
    sk, sv = saved
    b, kv_heads, t, head_dim = sk.shape
    if sv.shape != sk.shape or sk.stride() != sv.stride() or k_cache.stride() != v_cache.stride():
        raise ValueError("the saved k and v, and the two caches, must each share one layout")
    if b * t:
        _restore_kernel[(b * t, kv_heads)](
            k_cache, v_cache, slots, sk, sv, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), sk.stride(0),
            sk.stride(1), sk.stride(2), t, head_dim, BLOCK=max(16, triton.next_power_of_2(head_dim)))


@triton.jit
def _silu_mul_kernel(GU, OUT, stride_gu, stride_out, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dt = OUT.dtype.element_ty
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + N + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt)  # F.silu, rounded to the activation dtype
    tl.store(OUT + row * stride_out + offs, (act.to(tl.float32) * u).to(dt), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``(..., 2 I)`` (gate the first half, up the second, last dim
    contiguous); ``(..., I)`` in its dtype, with torch's roundings (``F.silu(gate) * up``)."""
    width = gate_up.shape[-1]
    if width % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be (..., 2 * I) with a contiguous last dim, got {tuple(gate_up.shape)}")
    n = width // 2
    flat = gate_up.reshape(-1, width)
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    oflat = out.reshape(-1, n)
    block = min(1024, triton.next_power_of_2(n))
    if flat.shape[0]:
        _silu_mul_kernel[(flat.shape[0], triton.cdiv(n, block))](flat, oflat, flat.stride(0), oflat.stride(0), n,
                                                                   BLOCK=block)
    return out
