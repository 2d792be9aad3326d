"""``block_threshold`` (Fast-dLLM v2): parallel denoising of fixed blocks with a confidence threshold.

Blocks sit at absolute multiples of ``block_size``: full prompt blocks are prefilled with the
block mask, the prompt's last partial block is completed by the first generated block. Inside a
block, sub-blocks are denoised in order: each step forwards the block against the cached prefix
without writing KV, fills every masked position of the active sub-block whose top-1 probability
exceeds the threshold (always at least the most confident one), and repeats until the sub-block
is full. A full block is committed with one KV-writing forward, whose last prediction seeds the
next block.

With ``sub_block_cache`` the block's KV is written by its whole-block forwards and reused by the
sub-block steps; ``sub_block_rule`` says which step runs what:

``"published"`` (Fast-dLLM v2's ``generate``): the whole block runs while the active sub-block's
first token is still masked (and once at the block's first step, to write the block's KV); after
that only the sub-block's own tokens run, sub-block 0 included.
``"window"``: the whole block runs at the first step of every sub-block and at every step of
sub-block 0; otherwise the sub-block plus the position before it (the state that predicts the
sub-block's first token) runs.

A prompt holding the mask id is refused (:class:`MaskInPromptError`): the decoder would take the
position for one to fill.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...vla.modes import AttentionMode
from ..backend import Backend, Prompt, TokenArray
from .common import CountingBackend, Decoded, check_no_mask

SUB_BLOCK_RULES = ("published", "window")


@dataclass(frozen=True, slots=True)
class BlockOptions:
    mask_id: int
    end_id: int
    block_size: int = 32
    sub_block_size: int = 8
    threshold: float = 0.9
    max_new_tokens: int = 256
    commit_mode: AttentionMode = AttentionMode.BIDIRECTIONAL  # or CAUSAL (Fast-dVLM / Fast-dDrive)
    # Reuse the block's KV while a sub-block denoises (recompute only the sub-block): faster, an
    # approximation of the full-block step. ``sub_block_rule``: when the whole block re-runs (see above).
    sub_block_cache: bool = False
    sub_block_rule: str = "published"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.sub_block_size < 1 or self.block_size % self.sub_block_size:
            raise ValueError(f"sub_block_size ({self.sub_block_size}) must divide block_size ({self.block_size})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.commit_mode not in (AttentionMode.BIDIRECTIONAL, AttentionMode.CAUSAL):
            raise ValueError(f"commit_mode must be bidirectional or causal, got {self.commit_mode}")
        if self.sub_block_rule not in SUB_BLOCK_RULES:
            raise ValueError(f"sub_block_rule must be one of {SUB_BLOCK_RULES}, got {self.sub_block_rule!r}")


def _denoise_step(fw: CountingBackend, block: TokenArray, block_start: int, sub: int, first_step: bool,
                  block_kv: bool, options: BlockOptions) -> None:
    """One forward and one round of unmasking inside sub-block ``[sub, sub + sub_block_size)``;
    ``block_kv``: an earlier step of this block has written the block's KV."""
    size, mask = options.sub_block_size, options.mask_id
    lo = None
    if options.sub_block_cache and options.sub_block_rule == "published":
        if block_kv and block[sub] != mask:
            lo = sub  # the sub-block's first token is known, so its state predicts the next position
    elif options.sub_block_cache and not first_step and sub > 0:
        # The position before the sub-block rides along so the shifted prediction of the
        # sub-block's first position comes from a fresh state; the rest of the block is cached.
        lo = sub - 1
    if lo is not None:
        res = fw.step(block[None, lo: sub + size], block_start + lo, mode=AttentionMode.BIDIRECTIONAL,
                      write_kv=True, kv_end=block_start + len(block))
    else:
        lo = 0
        # With the sub-block cache the whole-block step writes the block's KV for the later sub-block steps.
        res = fw.step(block[None], block_start, mode=AttentionMode.BIDIRECTIONAL, write_kv=options.sub_block_cache)
    # Prediction for block position j comes from the state at j - 1.
    positions = np.arange(max(sub, 1), sub + size)
    positions = positions[block[positions] == mask]
    pred = res.top1[0, positions - 1 - lo]
    conf = res.prob[0, positions - 1 - lo]
    fill = conf > options.threshold
    fill[int(np.argmax(conf))] = True
    block[positions[fill]] = pred[fill]


def block_threshold(backend: Backend, prompt: Prompt, options: BlockOptions) -> Decoded:
    check_no_mask(prompt, options.mask_id)
    fw = CountingBackend(backend)
    size, mask, end = options.block_size, options.mask_id, options.end_id
    p = len(prompt)
    aligned = (p // size) * size
    if aligned == p:
        seed = int(fw.prefill(prompt, mode=AttentionMode.BLOCK).top1[0, -1])
        if seed == end:  # as after a commit: no block to denoise
            return fw.result([], "end")
        block_start, block, generated_from = p, np.full(size, mask, dtype=np.int64), 0
        block[0] = seed
    else:
        fw.prefill(prompt, length=aligned, mode=AttentionMode.BLOCK)
        block_start, block = aligned, np.full(size, mask, dtype=np.int64)
        block[: p - aligned] = prompt.token_ids[aligned:]
        generated_from = p - aligned
    out: list[int] = []
    while True:
        block_kv = False
        for sub in range(0, size, options.sub_block_size):
            first = True
            while (block[sub: sub + options.sub_block_size] == mask).any():
                _denoise_step(fw, block, block_start, sub, first, block_kv, options)
                first, block_kv = False, True
                new = block[generated_from:]
                ends = np.flatnonzero(new == end)
                if ends.size and not (new[: ends[0]] == mask).any():
                    out += new[: ends[0]].tolist()
                    return fw.result(out[: options.max_new_tokens], "end")
        out += block[generated_from:].tolist()
        if len(out) >= options.max_new_tokens:
            return fw.result(out[: options.max_new_tokens], "max_new_tokens")
        commit = fw.step(block[None], block_start, mode=options.commit_mode, write_kv=True)
        block_start, generated_from = block_start + size, 0
        block = np.full(size, mask, dtype=np.int64)
        block[0] = commit.top1[0, -1]
        if block[0] == end:
            return fw.result(out, "end")
