"""``scaffold_speculative`` (Fast-dDrive): the schema freezes the structure, a bidirectional draft
fills every value slot of a block at once, a causal verify keeps the longest prefix that greedy
(or seeded sampling) decoding would also have produced, plus one correction token.

Lossless by construction: a token is kept only if the causal verify forward, which sees exactly
the kept prefix, predicts it; so the answer equals scaffold-constrained ``ar_greedy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ...vla.modes import AttentionMode
from ...vla.slot_constraints import SlotConstraints
from ..backend import AllowedTokens, Backend, Prompt, Sampling, TokenArray
from .common import CountingBackend, Decoded, ScaffoldLike, allowed_after, first_prediction


@dataclass(frozen=True, slots=True)
class SpeculativeOptions:
    mask_id: int
    block_size: int = 32
    # Draft slots whose probability is not above this stay masked and end the accepted prefix
    # there; 0 drafts every slot. Any value keeps the answer lossless, it only trades forwards.
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")


def section_blocks(scaffold: ScaffoldLike, begin: int, end: int, block_size: int) -> Iterator[tuple[int, int]]:
    """Blocks of at most ``block_size`` positions in ``[begin, end)`` that never cross a section."""
    for section in scaffold.sections:
        lo, hi = max(section.start, begin), min(section.end, end)
        for a in range(lo, hi, block_size):
            yield a, min(a + block_size, hi)


def speculate(fw: CountingBackend, scaffold: ScaffoldLike, options: SpeculativeOptions, prompt_len: int,
              out: TokenArray, pending: npt.NDArray[np.int64], begin: int, end: int,
              sampling: Sampling | None = None, constraints: SlotConstraints | None = None) -> npt.NDArray[np.int64]:
    """Fill ``out[:, begin:end]`` (rows in lockstep); ``pending`` is each row's prediction for
    position ``begin``. Returns the predictions for position ``end``.

    With ``constraints`` the verify forward's position ``i`` is constrained by the window tokens before it:
    while the draft up to ``i`` is accepted that is exactly the constraint ``ar_greedy`` applies, and what
    follows a rejection is discarded, so the answer stays the constrained ``ar_greedy``'s. The draft only
    gets each slot's slot-wide allowed set (a better draft, never a different answer)."""
    template, frozen = scaffold.token_ids, scaffold.frozen
    rows = out.shape[0]
    for a, b in section_blocks(scaffold, begin, end, options.block_size):
        while a < b:
            slot = ~frozen[a:b]
            window = np.repeat(template[None, a:b], rows, axis=0)
            if slot[0]:
                window[:, 0] = pending
            if slot[1:].any():
                draft_allowed = None if constraints is None else AllowedTokens(
                    constraints.table, np.repeat(constraints.draft_classes(a, b)[None], rows, axis=0))
                draft = fw.step(window, prompt_len + a, mode=AttentionMode.BIDIRECTIONAL, write_kv=False,
                                allowed=draft_allowed)
                # Shifted: the state at position i predicts position i + 1.
                fill = slot[None, 1:] & (draft.prob[:, :-1] > options.threshold)
                window[:, 1:] = np.where(fill, draft.top1[:, :-1], window[:, 1:])
            verify = fw.step(window, prompt_len + a, mode=AttentionMode.CAUSAL, write_kv=True, sampling=sampling,
                             allowed=allowed_after(constraints, np.concatenate([out[:, :a], window], axis=1), a))
            target = verify.sampled if sampling is not None else verify.top1
            assert target is not None
            ok = ~slot[None, 1:] | (window[:, 1:] == target[:, :-1])
            # Rows advance in lockstep by the shortest accepted prefix: keeping fewer tokens than
            # a row could is still lossless, and its next token is the verify's prediction anyway.
            kept = 1 + (int(np.min(np.where(ok.all(axis=1), ok.shape[1], np.argmin(ok, axis=1))))
                        if ok.shape[1] else 0)
            out[:, a: a + kept] = window[:, :kept]
            pending = target[:, kept - 1].copy()
            if a + kept < b:
                fw.truncate(prompt_len + a + kept)
            a += kept
    return pending


def scaffold_speculative(backend: Backend, prompt: Prompt, scaffold: ScaffoldLike,
                         options: SpeculativeOptions, constraints: SlotConstraints | None = None) -> Decoded:
    fw = CountingBackend(backend)
    pending = first_prediction(fw, prompt, scaffold, constraints)
    out = np.empty((1, len(scaffold.token_ids)), dtype=np.int64)
    speculate(fw, scaffold, options, len(prompt), out, pending, 0, out.shape[1], constraints=constraints)
    return fw.result(out, "scaffold")
