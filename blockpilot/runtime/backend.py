"""The backend protocol every decoder runs over, and the plain data that crosses it.

Torch-free on purpose: decoders, the planner and the ONNX Runtime / TensorRT backends import this
without pulling torch in. Only per-position results (top-1 id, its probability, an optional
sampled id) cross from the device to the host, never full-vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..errors import BlockpilotError
from ..vla.modes import AttentionMode

TokenArray = npt.NDArray[np.int64]


class BackendError(BlockpilotError, RuntimeError):
    """Base of the runtime's typed errors."""


class CacheFullError(BackendError):
    """A forward would write past the KV cache capacity of the backend."""


class PromptError(BackendError):
    """A prompt cannot be run as given (too long for the cache, images in the wrong place, ...)."""


class BackendArgumentError(BackendError, ValueError):
    """A ``step`` / ``fork`` / ``truncate`` call breaks the :class:`Backend` contract; the message names the
    argument. Raised by the shared checks below, before any forward, so a refused call changes nothing."""


# The backend names, once: a checkpoint runs on torch or cuda, a bundle on ONNX Runtime or TensorRT.
CHECKPOINT_BACKENDS = ("torch", "cuda")  # cuda: runtime.cuda_backend (static cache, graphs, Triton)
BUNDLE_BACKENDS = ("onnxruntime", "tensorrt")
BACKENDS = CHECKPOINT_BACKENDS + BUNDLE_BACKENDS


@dataclass(frozen=True, slots=True)
class Sampling:
    """Draw one token per position at ``temperature``, one ``seed`` per batch row.

    The noise of position ``slot`` in row ``r`` depends only on ``(seeds[r], slot, token id)``
    (a counter-based hash, :func:`blockpilot.runtime.sampling.gumbel_keys`), so a position
    re-verified after a rejected draft draws the same token, and every backend draws alike.
    """

    temperature: float
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature must be positive, got {self.temperature}")
        if not self.seeds:
            raise ValueError("sampling needs one seed per batch row")


@dataclass(frozen=True, slots=True)
class AllowedTokens:
    """Which token ids each position of a step may predict: ``table[classes[r, i]]`` for position ``i`` of row ``r``.

    ``table`` ``(C, V)`` bool is the same array object on every call of one planner (a backend uploads it once
    and keys its device copy by identity); ``classes`` ``(batch, T)`` int64 picks a row per position. Row 0 of
    the tables the runtime builds allows every token. Masked-out logits become ``-inf`` on the device before
    the softmax, the top-1 and any sampling, so the reported probability is the constrained one.
    """

    table: npt.NDArray[np.bool_]
    classes: TokenArray

    def check(self, batch: int, tokens: int, vocab_size: int) -> None:
        """Raise :class:`BackendArgumentError` naming what disagrees with a step of ``(batch, tokens)`` over
        ``vocab_size``."""
        if self.table.ndim != 2 or self.table.shape[1] != vocab_size or self.table.dtype != np.bool_:
            raise BackendArgumentError(f"allowed-token table must be bool (C, {vocab_size}), got {self.table.dtype} "
                             f"{self.table.shape}")
        if self.classes.shape != (batch, tokens):
            raise BackendArgumentError(f"allowed-token classes must have shape ({batch}, {tokens}), got "
                                       f"{self.classes.shape}")
        if self.classes.size and (self.classes.min() < 0 or self.classes.max() >= self.table.shape[0]):
            raise BackendArgumentError(f"allowed-token classes must lie in [0, {self.table.shape[0]}), got range "
                             f"[{self.classes.min()}, {self.classes.max()}]")


@dataclass(frozen=True, slots=True)
class Prompt:
    """Token ids of one prompt plus its camera images (``HxWx3`` uint8 RGB, in prompt order)."""

    token_ids: TokenArray
    images: tuple[npt.NDArray[np.uint8], ...] = ()

    def __post_init__(self) -> None:
        ids = np.asarray(self.token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise PromptError(f"prompt token_ids must be a non-empty 1-D array, got shape {ids.shape}")
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "images", tuple(self.images))

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True, slots=True)
class StepResult:
    """Per-position results of one forward, shape ``(batch, tokens)``.

    Position ``i`` holds the prediction made *at* ``i``, i.e. for the token at ``i + 1``
    (Fast-dLLM v2's shifted logits); decoders do the shifting. The mask token is never predicted.
    """

    top1: TokenArray
    prob: npt.NDArray[np.float32]
    sampled: TokenArray | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """One model instance with one static KV cache, at batch one (or N rows after :meth:`fork`).

    ``length`` is the number of valid cache slots; ``capacity`` the allocated slots.
    """

    @property
    def length(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        """Reset to batch one, encode the images, write KV for ``prompt[:length]`` (default all)
        from slot 0, and return the prediction at the last prefilled position, shape ``(1, 1)``.
        ``length=0`` only resets (no forward; the result is empty, shape ``(1, 0)``)."""
        ...

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        """Forward ``tokens`` ``(batch, T)`` at slots ``start ..``; they see cache slots ``[0, start)``
        (``[0, kv_end)`` with ``kv_end``) and each other under ``mode``. With ``write_kv`` the cache
        length becomes ``max(start + T, kv_end)``; without, the cache is untouched. ``allowed``
        restricts what each position may predict (top-1, probability and sample alike)."""
        ...

    def fork(self, n: int) -> None:
        """Copy the batch-one cache into ``n`` rows that share its prefix."""
        ...

    def truncate(self, length: int) -> None:
        """Forget cache slots from ``length`` on (static buffers: nothing moves)."""
        ...


def check_tokens(tokens: npt.ArrayLike, vocab_size: int, batch: int) -> TokenArray:
    """Tokens as an ``(batch, T)`` int64 array, with a clear error for a bad shape or id."""
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[0] != batch or arr.shape[1] == 0:
        raise BackendArgumentError(f"step tokens must have shape ({batch}, T>0), got {arr.shape}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise BackendArgumentError(f"step token ids must lie in [0, {vocab_size}), got range "
                                   f"[{arr.min()}, {arr.max()}]")
    return arr


@dataclass(frozen=True, slots=True)
class CheckedStep:
    """A step that passed :func:`check_step`: its ``(batch, T)`` tokens and the end of the keys it sees
    (``[0, key_end)``), which is also the cache length once the step is written (with ``write_kv``)."""

    tokens: TokenArray
    key_end: int


def check_step(tokens: npt.ArrayLike, start: int, *, length: int, capacity: int, batch: int, vocab_size: int,
               write_kv: bool, kv_end: int | None = None, sampling: Sampling | None = None,
               allowed: AllowedTokens | None = None) -> CheckedStep:
    """The :meth:`Backend.step` contract, checked once for every backend over a cache of ``capacity`` slots that
    holds ``length`` valid ones in ``batch`` rows. Raises :class:`BackendArgumentError` (or
    :class:`CacheFullError` for a window past ``capacity``).

    The ``kv_end`` rule (Fast-dLLM v2's sub-block cache, :mod:`blockpilot.runtime.decoders.block`): the step
    writes its own window and lets it see keys up to ``kv_end``, so ``kv_end`` needs ``write_kv`` and lies in
    ``[start + T, max(length, start + T)]``: it may end the window, or reach slots written before, never
    unwritten ones."""
    arr = check_tokens(tokens, vocab_size, batch)
    t = arr.shape[1]
    if allowed is not None:
        allowed.check(batch, t, vocab_size)
    if start < 0 or start > length:
        raise BackendArgumentError(f"step at slot {start} outside 0..{length}: the cache holds {length} slots "
                                   "and a later start would leave a gap")
    if sampling is not None and len(sampling.seeds) != batch:
        raise BackendArgumentError(f"sampling needs {batch} seeds (one per row), got {len(sampling.seeds)}")
    end = start + t
    if kv_end is not None:
        if not write_kv or kv_end < end:
            raise BackendArgumentError(f"kv_end={kv_end} needs write_kv=True and kv_end >= start + tokens ({end})")
        if kv_end > max(length, end):
            raise BackendArgumentError(f"kv_end {kv_end} reaches past the valid cache ({length} slots)")
    if end > capacity:  # every backend holds the window in its cache, a draft (write_kv=False) too
        raise CacheFullError(f"KV cache write of {t} token(s) at slot {start} exceeds capacity {capacity}")
    return CheckedStep(arr, end if kv_end is None else kv_end)


def check_fork(n: int, *, rows: int, max_batch: int) -> None:
    """The :meth:`Backend.fork` contract: from a batch-one cache (``rows``) into ``1 <= n <= max_batch`` rows."""
    if rows != 1:
        raise BackendArgumentError("fork() needs a batch-one cache; prefill first")
    if n < 1:
        raise BackendArgumentError(f"fork({n}) needs at least one row")
    if n > max_batch:
        raise BackendArgumentError(f"fork({n}) exceeds this backend's max_batch {max_batch}")


def check_truncate(length: int, current: int) -> None:
    """The :meth:`Backend.truncate` contract: keep ``0 <= length <= current`` valid slots."""
    if not 0 <= length <= current:
        raise BackendArgumentError(f"truncate({length}) outside 0..{current}")


def row_seeds(seed: int, rows: int) -> Sequence[int]:
    """Distinct, reproducible per-row seeds derived from one user seed."""
    return [int((seed * 1_000_003 + r * 7_919) % (2**31 - 1)) for r in range(rows)]


def prefill_length(prompt: Prompt, length: int | None, capacity: int) -> int:
    """How many prompt tokens a prefill writes (all unless ``length``), checked against the prompt and
    a cache of ``capacity`` slots; raises :class:`PromptError`."""
    n = len(prompt) if length is None else length
    if not 0 <= n <= len(prompt):
        raise PromptError(f"prefill length {n} outside 0..{len(prompt)}")
    if len(prompt) > capacity:
        raise PromptError(f"prompt of {len(prompt)} tokens does not fit the KV cache ({capacity} slots)")
    return n
