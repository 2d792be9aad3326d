"""The torch math every kernel and plugin is checked against: block-diffusion attention and FP8 quantization.

**Attention.** Shapes (batch one): ``q`` ``(1, H, T, D)`` holds the window's queries (after RoPE) at cache slots
``start .. start + T - 1``; the caches ``(1, Hkv, C, D)`` already hold the window's K/V (see
:func:`write_window`). Query ``i`` sees key slot ``k < key_end`` when ``mode`` allows it for the query slot
``q = start + i``: 0 causal ``k <= q``, 1 block ``k // block_size <= q // block_size``, 2 bidirectional.
Grouped-query attention maps query head ``h`` to K/V head ``h // (H // Hkv)``.

**FP8 (e4m3).** modelopt's FP8 fake quantization (``tensor_quant._fp8_eager``): ``quant = 448 / amax`` (an
``amax <= 2**-24`` counts as 1), ``q = e4m3(clamp(x * quant, ±448))``, dequantized as ``q * (1 / quant)``.
:func:`quant_scale` and :func:`quantize_e4m3` are the rule, used by the CUDA backend's ``Fp8Linear``;
:func:`quantize_rows_ref` is what the Triton kernels of :mod:`blockpilot.kernels.fp8_quant` match to the bit.
"""

from __future__ import annotations

import torch

from ..vla.modes import AttentionMode

IntLike = int | torch.Tensor
E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
TINY_AMAX = 1.0 / (1 << 24)  # an amax at or below this counts as 1


def as_int(value: IntLike, name: str) -> int:
    """``value`` as a Python int; a tensor must hold exactly one element (a scalar or a ``(1,)`` tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one element, got shape {tuple(value.shape)}")
        return int(value.reshape(-1)[0].item())
    return int(value)


def allowed_keys(q_slots: torch.Tensor, key_end: int, mode: int, block_size: int) -> torch.Tensor:
    """Boolean ``(len(q_slots), key_end)``: True where the query slot may see the key slot."""
    k = torch.arange(key_end, device=q_slots.device)[None, :]
    q = q_slots[:, None]
    if mode == AttentionMode.CAUSAL.id:
        return k <= q
    if mode == AttentionMode.BLOCK.id:
        if block_size <= 0:
            raise ValueError(f"block mode needs a positive block_size, got {block_size}")
        return torch.div(k, block_size, rounding_mode="floor") <= torch.div(q, block_size, rounding_mode="floor")
    if mode == AttentionMode.BIDIRECTIONAL.id:
        return torch.ones(q.shape[0], key_end, dtype=torch.bool, device=q_slots.device)
    raise ValueError(f"mode must be one of {AttentionMode.ids()}, got {mode}")


def check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(H, Hkv, T, C, D)`` of a valid call, else ``ValueError`` naming the mismatch."""
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[0] != 1 or k_cache.shape[0] != 1:
        raise ValueError(f"expected q (1, H, T, D) and caches (1, Hkv, C, D), got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _, heads, t, d = q.shape
    _, kv_heads, capacity, d_kv = k_cache.shape
    if d != d_kv:
        raise ValueError(f"head_dim of q ({d}) and of the caches ({d_kv}) differ")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    return heads, kv_heads, t, capacity, d


def block_diffusion_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: IntLike,
                                  key_end: IntLike, mode: IntLike, block_size: int, scale: float) -> torch.Tensor:
    """Attention of the window's queries over the cache slots ``[0, key_end)``; returns float32 ``(1, H, T, D)``.

    ``start``, ``key_end`` and ``mode`` are ints or one-element tensors. The math runs in float32 whatever the
    input dtype. A query that sees no key at all (only possible with ``key_end <= start`` in causal or block
    mode) gets NaN, as a softmax over nothing does.
    """
    heads, kv_heads, t, capacity, _ = check_shapes(q, k_cache, v_cache)
    start_i, end_i, mode_i = as_int(start, "start"), as_int(key_end, "key_end"), as_int(mode, "mode")
    if not 0 <= end_i <= capacity or start_i < 0:
        raise ValueError(f"need start >= 0 and 0 <= key_end <= capacity {capacity}, got start {start_i}, "
                         f"key_end {end_i}")
    groups = heads // kv_heads
    keys = k_cache[:, :, :end_i].float().repeat_interleave(groups, dim=1)
    values = v_cache[:, :, :end_i].float().repeat_interleave(groups, dim=1)
    q_slots = start_i + torch.arange(t, device=q.device)
    allowed = allowed_keys(q_slots, end_i, mode_i, block_size)
    scores = torch.matmul(q.float(), keys.transpose(2, 3)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values)


def write_window(past: torch.Tensor, new: torch.Tensor, start: IntLike) -> torch.Tensor:
    """A copy of the cache ``past`` ``(1, Hkv, C, D)`` with the window ``new`` ``(1, Hkv, T, D)`` at slots
    ``start .. start + T - 1`` (cast to the cache's dtype)."""
    start_i = as_int(start, "start")
    t, capacity = new.shape[2], past.shape[2]
    if past.dim() != 4 or new.dim() != 4 or past.shape[:2] != new.shape[:2] or past.shape[3] != new.shape[3]:
        raise ValueError(f"window {tuple(new.shape)} does not fit cache {tuple(past.shape)}")
    if start_i < 0 or start_i + t > capacity:
        raise ValueError(f"window slots {start_i}..{start_i + t - 1} fall outside the cache capacity {capacity}")
    out = past.clone()
    out[:, :, start_i:start_i + t] = new.to(past.dtype)
    return out


def quant_scale(amax: torch.Tensor) -> torch.Tensor:
    """``448 / amax`` in float32, modelopt's rule (a zero or tiny ``amax`` counts as 1)."""
    amax = amax.to(torch.float32)
    safe = torch.where(amax <= TINY_AMAX, torch.ones_like(amax), amax)
    return FP8_MAX / safe


def quantize_e4m3(x: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """``x * quant`` clamped to ±448 and rounded to float8 e4m3."""
    return (x.to(torch.float32) * quant).clamp(-FP8_MAX, FP8_MAX).to(E4M3)


def padded_rows(m: int, pad_to: int) -> int:
    """``m`` rounded up to a multiple of ``pad_to`` (``ValueError`` unless ``pad_to >= 1``)."""
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    return -(-m // pad_to) * pad_to


def quantize_rows_ref(x: torch.Tensor, *, quant: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                      pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq (M_pad, K) float8 e4m3, dequant (M_pad, 1) float32)`` of ``x`` ``(M, K)`` in torch ops: the static
    scale ``quant`` or else ``448 / amax(|x|)`` over the rows that ``rows`` ``(M, 1)`` weights 1; rows past ``M``
    (up to a multiple of ``pad_to``) are zeros. :func:`blockpilot.kernels.fp8_quant.quantize_rows` matches it."""
    m = x.shape[0]
    if quant is None:
        quant = quant_scale((x.abs() if rows is None else x.abs() * rows).amax())
    quant = quant.reshape(()).to(torch.float32)
    pad = padded_rows(m, pad_to) - m
    xq = quantize_e4m3(torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x, quant)
    dequant = (1.0 / quant).reshape(1, 1).expand(xq.shape[0], 1).contiguous()
    return xq, dequant
