"""``shared_prefix_rollouts``: decode the answer greedily up to one section (the trajectory),
fork the KV cache N ways and decode that section in every fork with seeded sampling (its first
token included: each row draws it, so rows may differ from the section's first value on).

The prefix is computed once; the N rollouts run as one batched forward per step, which at batch
one on a GPU costs about what a single row does (decoding is bandwidth-bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...vla.modes import AttentionMode
from ...vla.slot_constraints import SlotConstraints
from ..backend import AllowedTokens, Backend, Prompt, Sampling, row_seeds
from .common import CountingBackend, Decoded, ScaffoldLike, first_prediction
from .speculative import SpeculativeOptions, speculate


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    speculative: SpeculativeOptions
    rollouts: int = 4
    temperature: float = 0.5
    seed: int = 0
    fork_section: str = "trajectory"

    def __post_init__(self) -> None:
        if self.rollouts < 1:
            raise ValueError(f"rollouts must be at least 1, got {self.rollouts}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def shared_prefix_rollouts(backend: Backend, prompt: Prompt, scaffold: ScaffoldLike,
                           options: RolloutOptions, constraints: SlotConstraints | None = None) -> Decoded:
    """``Decoded.tokens`` has one row per rollout; rows agree before the forked section. ``constraints`` apply
    to the greedy prefix and, before sampling, to every row's draws."""
    starts = {s.key: s.start for s in scaffold.sections}
    if options.fork_section not in starts:
        raise ValueError(f"the scaffold has no section {options.fork_section!r} to fork at "
                         f"(sections: {sorted(starts)})")
    fork_at, n = starts[options.fork_section], len(scaffold.token_ids)
    fw = CountingBackend(backend)
    pending = first_prediction(fw, prompt, scaffold, constraints)
    prefix = np.empty((1, n), dtype=np.int64)
    pending = speculate(fw, scaffold, options.speculative, len(prompt), prefix, pending, 0, fork_at,
                        constraints=constraints)
    fw.fork(options.rollouts)
    out = np.repeat(prefix, options.rollouts, axis=0)
    sampling = Sampling(options.temperature, tuple(row_seeds(options.seed, options.rollouts)))
    pending = np.repeat(pending, options.rollouts)
    if fork_at < n and not scaffold.frozen[fork_at]:
        # The section opens with a value: it is a draw too, made by the last position before the
        # fork, so that position runs again in every row (same tokens, same KV) with sampling.
        slot = len(prompt) + fork_at - 1
        last = prefix[0, fork_at - 1] if fork_at > 0 else prompt.token_ids[-1]
        fw.truncate(slot)
        allowed = None if constraints is None else AllowedTokens(
            constraints.table, np.full((options.rollouts, 1), constraints.class_at(prefix[0], fork_at), np.int64))
        drawn = fw.step(np.full((options.rollouts, 1), last), slot, mode=AttentionMode.CAUSAL, write_kv=True,
                        sampling=sampling, allowed=allowed).sampled
        assert drawn is not None
        pending = drawn[:, 0]
    speculate(fw, scaffold, options.speculative, len(prompt), out, pending, fork_at, n, sampling, constraints)
    return fw.result(out, "scaffold")
