"""Block-diffusion attention of one LM step as a Triton kernel (TensorRT plugin and GPU fast path).

:func:`block_diffusion_attention` computes what :func:`blockpilot.kernels.reference.block_diffusion_attention_ref`
does, flash-attention style: each program loads a tile of query rows once, walks key tiles of its K/V head, masks
each score tile by slot index for the mode, and keeps an online softmax (running max and sum) in float32. Nothing
of size ``T x key_end`` is ever materialised.

Grouped-query attention is packed: the grid is ``(K/V head, row tile, split)`` and the ``G = H / Hkv`` query heads
of one K/V head share its programs, so every K/V tile loaded serves all ``G`` heads. Row ``r`` of a K/V head is
query head ``kv_head * G + r % G`` at window position ``r // G`` (position-major, so a tile's last position still
bounds the keys it may see: later key tiles are skipped, not masked).

Split-KV (flash-decoding): with ``num_splits = S > 1`` each row tile's key tiles ``[0, hi)`` are cut into ``S``
contiguous ranges, one program each; the programs write normalised partial outputs and their log-sum-exps
(float32) into a workspace (:class:`SplitWorkspace`), and :func:`blockpilot.kernels.merge.merge_splits_` folds
them into the output. The ranges are computed in the kernel from the device-side ``key_end``, so one launch
configuration (one CUDA graph) serves every position; a range with no key tile (a short ``key_end``, or more
splits than tiles) writes zeros and ``lse = -inf`` and weighs nothing in the merge. A 32-token step of a 3B model
(16 query heads, 2 K/V heads) is 8 programs unsplit; an H100 has 132 SMs, so the default ``S`` comes from the SM
count (:func:`default_num_splits`).

``start``, ``key_end`` and ``mode`` are read by the kernel from device memory (one-element integer tensors),
so a caller whose values live on the device (the TensorRT plugin: they are tensors of the engine) launches
without a device-to-host sync; Python ints are accepted too and checked on the host.

:func:`attention_with_lse` also returns the log-sum-exp of each query's allowed scores, the state that
:func:`blockpilot.kernels.merge.merge_attention_states` merges with another (a cached prefix's attention, say).
:func:`write_window_` writes the window's K or V into a cache in place, reading ``start`` the same way.

Without a GPU, set ``TRITON_INTERPRET=1`` before this module (or ``triton``) is first imported: the kernels
then run in Triton's interpreter on CPU tensors (slow; for tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..vla.modes import AttentionMode
from .merge import merge_splits_
from .reference import IntLike, as_int, check_shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # the heuristic's ceiling; an explicit num_splits may exceed it


class SplitWorkspace(NamedTuple):
    """The partial states of a split-KV launch, float32: ``out`` ``(H, T, S, D)``, ``lse`` ``(H, T, S)``."""

    out: torch.Tensor
    lse: torch.Tensor


@triton.jit
def _block_attention_kernel(Q, K, V, OUT, LSE, START, KEY_END, MODE,
                            stride_qh, stride_qt, stride_kh, stride_kc, stride_vh, stride_vc,
                            stride_oh, stride_ot, stride_os, stride_lh, stride_lt, stride_ls,
                            T, CAPACITY, HEAD_DIM, BLOCK_SIZE, qk_scale, SPLITS,
                            GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, IEEE: tl.constexpr, WRITE_LSE: tl.constexpr):
    kv_head = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(START).to(tl.int32)
    key_end = tl.minimum(tl.load(KEY_END).to(tl.int32), CAPACITY)
    mode = tl.load(MODE).to(tl.int32)

    offs_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = offs_r // GROUPS
    head = kv_head * GROUPS + offs_r % GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < GROUPS * T
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + head[:, None] * stride_qh + token[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_slot = start + token

    # The last key any row of this tile may see bounds the key tiles; this split takes its share of them.
    last_q = start + (tl.minimum(tile * BLOCK_M + BLOCK_M, GROUPS * T) - 1) // GROUPS
    causal_end = tl.minimum(key_end, last_q + 1)
    block_end = tl.minimum(key_end, (last_q // BLOCK_SIZE + 1) * BLOCK_SIZE)
    hi = tl.where(mode == 0, causal_end, tl.where(mode == 1, block_end, key_end))
    n_tiles = (hi + BLOCK_N - 1) // BLOCK_N
    lo = (split * n_tiles // SPLITS) * BLOCK_N
    hi = tl.minimum(((split + 1) * n_tiles // SPLITS) * BLOCK_N, hi)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
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
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + head[:, None] * stride_oh + token[:, None] * stride_ot + split * stride_os + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:  # natural log: m_i and log2(l_i) are in log2 units
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + head * stride_lh + token * stride_lt + split * stride_ls, lse, mask=row_ok)


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


def _tiles(rows: int, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    """``(block_m, block_n)``: the defaults, or the overrides checked (powers of two >= 16)."""
    bm, bn = block_m or min(64, _pow2(rows)), block_n or 32
    for name, size in (("block_m", bm), ("block_n", bn)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    return bm, bn


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def default_num_splits(heads: int, kv_heads: int, t: int, capacity: int, device: torch.device, *,
                       block_m: int | None = None, block_n: int | None = None) -> int:
    """The split count :func:`block_diffusion_attention` uses when given none: on CUDA, enough splits that the
    programs fill the SMs once (``ceil(SMs / (Hkv * row tiles))``), capped by the key tiles of the cache
    (``ceil(capacity / block_n)``) and :data:`MAX_SPLITS`; 1 when the unsplit grid already fills the GPU, and 1
    off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    bm, bn = _tiles(heads // kv_heads * t, block_m, block_n)
    programs = kv_heads * triton.cdiv(heads // kv_heads * t, bm)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(sms, programs), triton.cdiv(capacity, bn), MAX_SPLITS))


def workspace_numel(heads: int, t: int, head_dim: int, num_splits: int) -> int:
    """Float32 elements of a :class:`SplitWorkspace` (outputs, then log-sum-exps)."""
    return heads * t * num_splits * (head_dim + 1)


def attention_workspace(heads: int, t: int, head_dim: int, num_splits: int, device: torch.device, *,
                        storage: torch.Tensor | None = None) -> SplitWorkspace:
    """The workspace of a split-KV launch of ``H = heads`` query heads and ``T = t`` positions: fresh, or views
    over the front of ``storage`` (a contiguous float32 buffer of at least :func:`workspace_numel` elements, so
    one buffer serves every shape; carving views allocates nothing, so it may run inside a CUDA graph capture)."""
    n_out = heads * t * num_splits * head_dim
    need = workspace_numel(heads, t, head_dim, num_splits)
    if storage is None:
        storage = torch.empty(need, dtype=torch.float32, device=device)
    elif storage.dtype != torch.float32 or not storage.is_contiguous() or storage.numel() < need \
            or storage.device.type != torch.device(device).type:
        raise ValueError(f"storage must be a contiguous float32 tensor on {device} of >= {need} elements, got "
                         f"{storage.dtype} {tuple(storage.shape)} on {storage.device}")
    flat = storage.reshape(-1)
    return SplitWorkspace(flat[:n_out].view(heads, t, num_splits, head_dim),
                          flat[n_out:need].view(heads, t, num_splits))


def _resolve_splits(num_splits: int | None, workspace: SplitWorkspace | None, heads: int, kv_heads: int, t: int,
                    capacity: int, device: torch.device, bm: int, bn: int) -> int:
    if num_splits is None:
        if workspace is not None:
            return int(workspace.out.shape[2])
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return 1  # a workspace allocated here would not outlive someone else's capture: stay unsplit
        return default_num_splits(heads, kv_heads, t, capacity, device, block_m=bm, block_n=bn)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return num_splits


def _check_workspace(ws: SplitWorkspace, heads: int, t: int, splits: int, head_dim: int,
                     device: torch.device) -> None:
    want = ((heads, t, splits, head_dim), (heads, t, splits))
    got = (tuple(ws.out.shape), tuple(ws.lse.shape))
    if got != want or ws.out.dtype != torch.float32 or ws.lse.dtype != torch.float32 \
            or ws.out.device != device or ws.lse.device != device or ws.out.stride(-1) != 1:
        raise ValueError(f"workspace must be float32 {want[0]} and {want[1]} on {device} with a contiguous last "
                         f"dim, got {ws.out.dtype} {got[0]}, {ws.lse.dtype} {got[1]} on {ws.out.device}")


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: IntLike, key_end: IntLike,
            mode: IntLike, block_size: int, scale: float, out: torch.Tensor | None, lse: torch.Tensor | None,
            want_lse: bool, num_splits: int | None, workspace: SplitWorkspace | None, block_m: int | None,
            block_n: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    if not isinstance(mode, torch.Tensor):
        AttentionMode.from_id(as_int(mode, "mode"))  # ValueError naming the valid ids
    device = q.device
    if out is None:
        out = torch.empty_like(q)
    elif tuple(out.shape) != tuple(q.shape) or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} on {device} with a contiguous last dim, got "
                         f"{tuple(out.shape)} on {out.device}")
    if want_lse:
        if lse is None:
            lse = torch.empty(1, heads, t, dtype=torch.float32, device=device)
        elif tuple(lse.shape) != (1, heads, t) or lse.dtype != torch.float32 or lse.device != device:
            raise ValueError(f"lse must be float32 (1, {heads}, {t}) on {device}, got {lse.dtype} "
                             f"{tuple(lse.shape)} on {lse.device}")
    groups = heads // kv_heads
    bm, bn = _tiles(groups * t, block_m, block_n)
    splits = _resolve_splits(num_splits, workspace, heads, kv_heads, t, capacity, device, bm, bn)
    dst_lse: torch.Tensor | None
    if splits > 1:
        if workspace is None:
            workspace = attention_workspace(heads, t, head_dim, splits, device)
        _check_workspace(workspace, heads, t, splits, head_dim, device)
        dst, dst_lse = workspace.out, workspace.lse
        o_strides, l_strides = workspace.out.stride()[:3], workspace.lse.stride()
    else:
        dst, dst_lse = out, lse
        o_strides = (out.stride(1), out.stride(2), 0)
        l_strides = (0, 0, 0) if lse is None else (lse.stride(1), lse.stride(2), 0)
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    start_t, end_t, mode_t = (_device_scalar(v, n, device) for v, n in ((start, "start"), (key_end, "key_end"),
                                                                         (mode, "mode")))
    grid = (kv_heads, triton.cdiv(groups * t, bm), splits)
    _block_attention_kernel[grid](
        q, k_cache, v_cache, dst, dst if dst_lse is None else dst_lse, start_t, end_t, mode_t,
        q.stride(1), q.stride(2), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        *o_strides, *l_strides, t, capacity, head_dim, block_size, float(scale) * LOG2E, splits,
        GROUPS=groups, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(head_dim), IEEE=q.dtype == torch.float32,
        WRITE_LSE=dst_lse is not None,
    )
    if workspace is not None and splits > 1:
        merge_splits_(workspace.out, workspace.lse, out, lse)
    return out, lse


def block_diffusion_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: IntLike,
                              key_end: IntLike, mode: IntLike, block_size: int, scale: float,
                              out: torch.Tensor | None = None, *, block_m: int | None = None,
                              block_n: int | None = None, num_splits: int | None = None,
                              workspace: SplitWorkspace | None = None) -> torch.Tensor:
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
    sees no key gets zeros (the reference gives NaN there). ``block_m`` / ``block_n`` override the row / key tile
    sizes (powers of two >= 16; a row tile holds ``block_m / G`` positions of the ``G`` heads of a K/V head).

    ``num_splits``: the split-KV count (1: one pass, no workspace). ``None``: the splits of ``workspace`` when
    given, else :func:`default_num_splits` (1 off CUDA, and 1 while the current stream is being captured, where
    a workspace allocated here would be unsafe). ``workspace``: the partial states (:func:`attention_workspace`)
    for ``num_splits > 1``; allocated per call when ``None``. A caller that captures CUDA graphs allocates it
    before the capture (the eager warm-up run) and passes the same one to every replayed launch; it is scratch,
    so launches that run one after another on a stream (the layers of a forward) share it.
    """
    return _attend(q, k_cache, v_cache, start, key_end, mode, block_size, scale, out, None, False, num_splits,
                   workspace, block_m, block_n)[0]


def attention_with_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: IntLike,
                       key_end: IntLike, mode: IntLike, block_size: int, scale: float,
                       out: torch.Tensor | None = None, lse: torch.Tensor | None = None, *,
                       block_m: int | None = None, block_n: int | None = None, num_splits: int | None = None,
                       workspace: SplitWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_diffusion_attention` and the state's log-sum-exp: ``(out, lse)``, ``lse`` ``(1, H, T)``
    float32, ``log sum exp(scale * q . k)`` over each query's allowed keys (natural log; ``-inf`` for a query that
    sees no key, whose ``out`` is 0). ``lse``: an output buffer, allocated when ``None``."""
    got, got_lse = _attend(q, k_cache, v_cache, start, key_end, mode, block_size, scale, out, lse, True,
                           num_splits, workspace, block_m, block_n)
    assert got_lse is not None
    return got, got_lse


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
