"""Attention modes of one forward call (torch-free, so the runtime core can import it)."""

from __future__ import annotations

from enum import Enum


class AttentionMode(str, Enum):
    """Which keys a query may see.

    ``CAUSAL``: key slot <= query slot (AR decoding; also the "active block attends to the prefix
    and causally to itself" commit variant of Fast-dVLM / Fast-dDrive).
    ``BLOCK``: the Fast-dLLM v2 training / prefill mask: causal across blocks of ``block_size``,
    bidirectional inside a block; block boundaries at absolute slot multiples of ``block_size``.
    ``BIDIRECTIONAL``: the active window sees the whole cached prefix and all of itself (the
    block-diffusion denoising step).
    """

    CAUSAL = "causal"
    BLOCK = "block"
    BIDIRECTIONAL = "bidirectional"
