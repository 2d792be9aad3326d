"""What every decoder shares: the result type, the counting backend wrapper and the scaffold view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ...vla.modes import AttentionMode
from ...vla.slot_constraints import SlotConstraints
from ..backend import AllowedTokens, Backend, Prompt, PromptError, Sampling, StepResult, TokenArray


class MaskInPromptError(PromptError, ValueError):
    """The prompt holds the model's mask id, which only the decoder may place (a user text can
    spell the mask token). ``positions`` are the prompt indices that hold it."""

    def __init__(self, positions: Sequence[int], mask_id: int, length: int) -> None:
        self.positions = tuple(int(p) for p in positions)
        shown = ", ".join(map(str, self.positions[:8])) + (", ..." if len(self.positions) > 8 else "")
        super().__init__(f"the prompt ({length} tokens) holds the mask token id {mask_id} at position(s) {shown}; "
                         "the mask id marks positions for the decoder to fill and may not appear in a prompt")


def check_no_mask(prompt: Prompt, mask_id: int) -> None:
    """Raise :class:`MaskInPromptError` naming where ``prompt`` holds ``mask_id``."""
    found = np.flatnonzero(prompt.token_ids == mask_id)
    if found.size:
        raise MaskInPromptError(found.tolist(), mask_id, len(prompt))


class ScaffoldLike(Protocol):
    """The parts of :class:`blockpilot.vla.scaffold.Scaffold` decoders use (template, frozen, sections)."""

    @property
    def token_ids(self) -> TokenArray: ...

    @property
    def frozen(self) -> npt.NDArray[np.bool_]: ...

    @property
    def sections(self) -> Sequence[SectionLike]: ...


class SectionLike(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Decoded:
    """Answer tokens ``(rows, n)`` (no end token) and the forward passes that made them.

    ``forwards`` counts backend calls (prefill included); ``row_forwards`` weighs each call by its
    batch rows, so N forked rollouts in one batched call count N. ``stage_ms`` holds the last prefill's
    stage timings as the backend reported them (``vision``, ``prefill``).
    """

    tokens: TokenArray
    forwards: int
    row_forwards: int
    prefill_forwards: int
    stop: str  # "end" | "max_new_tokens" | "scaffold"
    stage_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def decode_forwards(self) -> int:
        return self.forwards - self.prefill_forwards

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens.shape[1] / max(self.decode_forwards, 1)


class CountingBackend:
    """A backend pass-through that counts the forwards and keeps the last prefill's stage timings (vision,
    prefill); every decoder runs over one and reports both in its :class:`Decoded`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.forwards = 0
        self.row_forwards = 0
        self.prefill_forwards = 0
        self.stage_ms: dict[str, float] = {}

    @property
    def length(self) -> int:
        return self.backend.length

    @property
    def capacity(self) -> int:
        return self.backend.capacity

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        if length != 0:  # length 0 only resets the backend (and encodes no tokens)
            self.forwards += 1
            self.row_forwards += 1
            self.prefill_forwards += 1
        result = self.backend.prefill(prompt, length=length, mode=mode)
        self.stage_ms = dict(result.stage_ms)
        return result

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        self.forwards += 1
        self.row_forwards += int(np.asarray(tokens).shape[0])
        if allowed is not None:  # only constrained decoders pass it (a backend without support never sees it)
            return self.backend.step(tokens, start, mode=mode, write_kv=write_kv, kv_end=kv_end, sampling=sampling,
                                     allowed=allowed)
        return self.backend.step(tokens, start, mode=mode, write_kv=write_kv, kv_end=kv_end, sampling=sampling)

    def fork(self, n: int) -> None:
        self.backend.fork(n)

    def truncate(self, length: int) -> None:
        self.backend.truncate(length)

    def result(self, tokens: npt.ArrayLike, stop: str) -> Decoded:
        arr = np.asarray(tokens, dtype=np.int64)
        return Decoded(arr[None] if arr.ndim == 1 else arr, self.forwards, self.row_forwards,
                       self.prefill_forwards, stop, dict(self.stage_ms))


def allowed_after(constraints: SlotConstraints | None, tokens: TokenArray, begin: int) -> AllowedTokens | None:
    """The constraint of a causal forward over answer positions ``begin .. tokens.shape[1] - 1`` (each predicts
    the next position, from the answer tokens before it); ``None`` without constraints."""
    if constraints is None:
        return None
    return AllowedTokens(constraints.table, constraints.classes_after(tokens, begin))


def first_prediction(fw: CountingBackend, prompt: Prompt, scaffold: ScaffoldLike,
                     constraints: SlotConstraints | None) -> npt.NDArray[np.int64]:
    """Prefill ``prompt`` and return the prediction for answer position 0, shape ``(1,)``. When that position is a
    constrained value slot, the prompt's last token runs again as a constrained one-token step (prefill itself
    takes no constraint), which costs one more forward only for answers that open with a value."""
    if constraints is None or scaffold.frozen[0]:
        return fw.prefill(prompt).top1[:, -1]
    last = len(prompt) - 1
    fw.prefill(prompt, length=last)
    allowed = AllowedTokens(constraints.table, np.array([[constraints.class_at([], 0)]], dtype=np.int64))
    return fw.step(prompt.token_ids[None, last:], last, mode=AttentionMode.CAUSAL, write_kv=True,
                   allowed=allowed).top1[:, -1]
