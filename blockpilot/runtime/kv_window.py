"""The window I/O of the KV cache (``kv_io: "window"`` in an export's spec), shared by the graph backends.

An ``lm_step`` of the window I/O reads the cache in place and returns only the window's new K/V, ``k_new`` /
``v_new`` ``(layers, 1, kv_heads, T, head_dim)``; the backend owns the one cache ``(layers, 1, kv_heads,
capacity, head_dim)`` and writes those rows at ``start`` for a committed step (a draft writes nothing). Exports
made before it (``kv_io: "full"``) take the whole cache in and give the whole cache back with the window written.

:func:`step_traffic` counts the KV-cache bytes one step moves under either I/O, from the graph's I/O shapes alone
(the 1.5B shape needs no export to be counted); ``benchmarks/bench_kv_io.py`` checks the counts against the
arrays a real ONNX Runtime step hands back. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from .plan_types import PlannerSetupError


class StaleExportError(PlannerSetupError):
    """An artifact made before the window KV I/O that this runtime does not run: re-export the bundle."""


REEXPORT = "re-export the bundle (blockpilot export) to rebuild its engines with the window KV I/O"


def write_rows(cache: npt.NDArray[Any], rows: npt.NDArray[Any], start: int) -> None:
    """Write the window's ``rows`` ``(layers, 1, kv_heads, T, head_dim)`` into ``cache`` at slots
    ``start .. start + T`` (in place). Raises ``ValueError`` when the shapes disagree or the window overflows."""
    t = rows.shape[3]
    if rows.shape[:3] != cache.shape[:3] or rows.shape[4:] != cache.shape[4:]:
        raise ValueError(f"window K/V of shape {rows.shape} does not fit the cache {cache.shape}")
    if not 0 <= start <= cache.shape[3] - t:
        raise ValueError(f"window of {t} row(s) at slot {start} outside the cache's {cache.shape[3]} slots")
    cache[:, :, :, start:start + t] = rows


@dataclass(frozen=True)
class StepTraffic:
    """KV-cache bytes of one LM step (K and V together).

    ``copied_in``: cache bytes copied into the graph's inputs (0 where the cache is bound in place);
    ``read``: cache bytes the graph reads (the whole cache for the full I/O, which writes every slot of its
    present; the visible ``key_end`` rows for the window I/O); ``written``: bytes the graph writes as outputs
    (the whole present cache, or the window's rows); ``committed``: bytes the backend writes into its cache
    afterwards (the window's rows on a committed window step; the full I/O swaps buffers instead)."""

    io: str
    copied_in: int
    read: int
    written: int
    committed: int

    @property
    def moved(self) -> int:
        """Every KV byte the step moves: copied in, read, written out and committed."""
        return self.copied_in + self.read + self.written + self.committed


def slot_bytes(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one cache slot, K and V of every layer."""
    return 2 * layers * kv_heads * head_dim * itemsize


def step_traffic(io: str, *, layers: int, kv_heads: int, head_dim: int, capacity: int, t: int, key_end: int,
                 itemsize: int = 4, commit: bool = True, copied_in: bool = False) -> StepTraffic:
    """:class:`StepTraffic` of a ``t``-token step seeing ``key_end`` slots of a ``capacity``-slot cache.
    ``copied_in``: the runtime copies the cache into the graph's input (a feed that is not bound in place)."""
    if io not in ("window", "full"):
        raise ValueError(f"io must be 'window' or 'full', got {io!r}")
    if not 0 < t <= key_end <= capacity:
        raise ValueError(f"need 0 < t ({t}) <= key_end ({key_end}) <= capacity ({capacity})")
    slot = slot_bytes(layers, kv_heads, head_dim, itemsize)
    cache = capacity * slot
    if io == "full":
        return StepTraffic(io, cache if copied_in else 0, cache, cache, 0)
    # The visible rows are gathered whole (the window's own slots are then taken from its K/V).
    return StepTraffic(io, cache if copied_in else 0, key_end * slot, t * slot, t * slot if commit else 0)
