"""Boolean attention masks by slot index (True = may attend)."""

from __future__ import annotations

import torch

from .modes import AttentionMode


def attention_mask(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    mode: AttentionMode,
    block_size: int | None = None,
) -> torch.Tensor:
    """Mask of shape ``(len(q_slots), len(k_slots))`` for absolute cache slots.

    Slots are sequence indices (where a token's K/V lives), not RoPE positions: Qwen2.5-VL's
    multimodal positions repeat inside an image, slots never do.
    """
    q = q_slots[:, None]
    k = k_slots[None, :]
    if mode is AttentionMode.CAUSAL:
        return k <= q
    if mode is AttentionMode.BLOCK:
        if block_size is None or block_size <= 0:
            raise ValueError("AttentionMode.BLOCK needs a positive block_size")
        return torch.div(k, block_size, rounding_mode="floor") <= torch.div(q, block_size, rounding_mode="floor")
    if mode is AttentionMode.BIDIRECTIONAL:
        return torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q_slots.device)
    raise ValueError(f"unknown attention mode {mode!r}")
