"""``ar_greedy``: the baseline, one token per forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...vla.modes import AttentionMode
from ...vla.slot_constraints import SlotConstraints
from ..backend import Backend, Prompt
from .common import CountingBackend, Decoded, ScaffoldLike, allowed_after, first_prediction


@dataclass(frozen=True, slots=True)
class ArOptions:
    """The ``ar`` decoder (``scaffold=True``: the scaffold-constrained baseline) or ``ar_free`` (free text up to
    ``max_new_tokens`` or ``end_id``)."""

    end_id: int
    max_new_tokens: int
    scaffold: bool = True


def ar_greedy(backend: Backend, prompt: Prompt, *, max_new_tokens: int, end_id: int,
              scaffold: ScaffoldLike | None = None, constraints: SlotConstraints | None = None) -> Decoded:
    """Greedy causal decoding. With ``scaffold``, frozen positions take the template's token and
    value slots the argmax (among the tokens ``constraints`` allows there, when given), and the answer
    is exactly the scaffold long (no end token)."""
    fw = CountingBackend(backend)
    start = len(prompt)
    if scaffold is not None:
        pending = int(first_prediction(fw, prompt, scaffold, constraints)[0])
        template, frozen = scaffold.token_ids, scaffold.frozen
        n = len(template)
        out = np.empty(n, dtype=np.int64)
        for j in range(n):
            out[j] = template[j] if frozen[j] else pending
            if j + 1 < n:
                pending = int(fw.step(out[None, j: j + 1], start + j, mode=AttentionMode.CAUSAL, write_kv=True,
                                      allowed=allowed_after(constraints, out[None, : j + 1], j)).top1[0, 0])
        return fw.result(out, "scaffold")
    pending = int(fw.prefill(prompt).top1[0, -1])
    tokens: list[int] = []
    while pending != end_id:
        tokens.append(pending)
        if len(tokens) >= max_new_tokens:
            return fw.result(tokens, "max_new_tokens")
        step = fw.step(np.array([[pending]]), start + len(tokens) - 1, mode=AttentionMode.CAUSAL, write_kv=True)
        pending = int(step.top1[0, 0])
    return fw.result(tokens, "end")
