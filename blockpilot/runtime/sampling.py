"""Counter-based sampling noise shared by every backend (torch here; ONNX / TensorRT graphs
reproduce the same integer arithmetic).

The Gumbel key of token ``v`` at cache slot ``s`` in a row with seed ``k`` is
``-log(-log(u))`` with ``u`` from a 32-bit integer hash of ``(k, s, v)``; the sampled token is
``argmax(logits / temperature + key)``, a draw from ``softmax(logits / temperature)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A well-mixing 32-bit integer finaliser (xor-shift-multiply), kept in int64 and masked.
    x = x & _MASK32
    x = (x ^ (x >> 16)) * 0x7FEB352D & _MASK32
    x = (x ^ (x >> 15)) * 0x846CA68B & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, slots: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``u`` in (0, 1) of shape ``(rows, len(slots), vocab_size)`` from int64 seeds and slots."""
    import torch

    vocab = torch.arange(vocab_size, device=slots.device, dtype=torch.int64)
    h = _mix32(seeds[:, None, None] * 0x9E3779B1 + _mix32(slots[None, :, None] + 0x632BE5AB))
    h = _mix32(h ^ (vocab[None, None, :] * 0x85EBCA77 & _MASK32))
    # 24 high-quality bits, centred in their bucket so u never reaches 0 or 1.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16_777_216.0)


def gumbel_keys(seeds: torch.Tensor, slots: torch.Tensor, vocab_size: int) -> torch.Tensor:
    import torch

    return -torch.log(-torch.log(uniform_noise(seeds, slots, vocab_size)))
