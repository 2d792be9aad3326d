"""Static, preallocated KV cache written by slot."""

from __future__ import annotations

import torch

from ..errors import BlockpilotError
from .config import LMConfig


class CacheCapacityError(BlockpilotError, RuntimeError):
    """A write would go past the preallocated capacity of the cache."""


class KVCache:
    """Keys and values for every layer in two fixed buffers of shape
    ``(num_layers, batch, num_kv_heads, capacity, head_dim)``.

    The cache holds no notion of "current length": callers say where a forward starts (``start``)
    and whether it writes; the runtime owns the bookkeeping.
    """

    def __init__(self, config: LMConfig, capacity: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if capacity <= 0 or batch <= 0:
            raise ValueError(f"KVCache capacity and batch must be positive (got {capacity}, {batch})")
        shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def _wrap(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    def rows(self, n: int) -> KVCache:
        """A cache over the first ``n`` batch rows of this one, sharing its storage."""
        if not 0 < n <= self.batch:
            raise ValueError(f"rows({n}) outside 1..{self.batch}")
        return KVCache._wrap(self.k[:, :n], self.v[:, :n])

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def check_room(self, start: int, length: int) -> None:
        if start < 0 or start + length > self.capacity:
            raise CacheCapacityError(
                f"KV cache write of {length} token(s) at slot {start} exceeds capacity {self.capacity}")

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
