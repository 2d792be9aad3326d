"""The published Fast-dLLM v2 ``generate`` loop, re-written over the plain :class:`VLAModel` as a parity oracle.

Written from the published rules, not from the runtime decoder: it keeps the published two caches
(the committed prefix, written only by the prefill and by each block's commit, and a separate block
cache that a whole-block step replaces and a sub-block step overwrites in place), and it decides
what each step forwards with the published test: with the block cache, the whole block runs while
the active sub-block's first token is masked or while there is no block cache yet; otherwise only
the sub-block's tokens run. Predictions are shifted one position (the state at ``j - 1`` predicts
``j``; the published shift lets a window's first position predict itself, which never matters
because that position is never masked there).

``stale_block_cache=True`` reproduces one more published detail: the block cache is never reset
between blocks, so sub-block 0 of every block after the first runs only its tokens against the
previous block's cached keys and values (at the previous block's positions). The runtime's
``"published"`` rule instead runs the whole block at a block's first step, so the block's own KV is
cached; this oracle measures what that changes.

Deliberate differences from the published code, shared with the runtime (documented in the README):
a prompt of exactly one block is prefilled (the published test is ``len > block_size``), the answer
is cut at ``max_new_tokens`` and the last block is not committed (the published loop runs
``max_new_tokens // block_size`` whole blocks and commits each), and the mask id is never a prediction.
Camera images (Fast-dVLM / Fast-dDrive prompts) are encoded at the prefill, which must reach past
the last image token. Torch-heavy: for tests and benchmarks, not the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from ..vla.model import VLAModel, rope_continuation
from ..vla.modes import AttentionMode
from ..vla.vision import image_inputs


@dataclass
class PublishedRun:
    """The answer (no end token), why it stopped, and every forward as ``(kind, start slot, tokens)``,
    kind one of ``prefill``, ``block`` (whole-block step), ``sub`` (sub-block step), ``commit``."""

    tokens: list[int] = field(default_factory=list)
    stop: str = ""
    forwards: list[tuple[str, int, int]] = field(default_factory=list)


class _Oracle:
    def __init__(self, model: VLAModel, capacity: int, softmax_dtype: str, mask_id: int) -> None:
        self.model, self.mask_id, self.softmax_dtype = model, mask_id, softmax_dtype
        self.dtype = model.lm.embed_tokens.weight.dtype
        self.prefix = model.new_cache(capacity)  # committed KV only
        self.block_k: torch.Tensor | None = None  # the block cache: (layers, 1, kv_heads, block, head_dim)
        self.block_v: torch.Tensor | None = None
        self.run = PublishedRun()
        self.pixels: torch.Tensor | None = None
        self.grid: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None  # M-RoPE offset of tokens after an image prompt

    def set_images(self, ids: list[int], images: Sequence[npt.NDArray[np.uint8]]) -> None:
        vision = self.model.config.vision
        if vision is None:
            raise ValueError("the prompt has images but the model has no vision tower")
        self.pixels, self.grid = image_inputs(list(images), vision)
        self.delta = self.model.rope_index(torch.tensor([ids]), self.grid)[1]

    def _positions(self, start: int, length: int) -> torch.Tensor | None:
        return None if self.delta is None else rope_continuation(start, length, self.delta)

    def _top1(self, hidden: torch.Tensor) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        logits = self.model.logits(hidden)[0]
        logits = logits.float() if self.softmax_dtype == "float32" else logits.to(self.dtype)
        logits[:, self.mask_id] = float("-inf")
        prob, top1 = torch.softmax(logits, dim=-1).max(dim=-1)
        return top1.numpy().astype(np.int64), prob.float().numpy()

    def prefill(self, ids: list[int]) -> int:
        self.run.forwards.append(("prefill", 0, len(ids)))
        hidden = self.model(torch.tensor([ids]), pixel_values=self.pixels, grid_thw=self.grid, cache=self.prefix,
                            start=0, mode=AttentionMode.BLOCK, block_size=self.model.config.diffusion.block_size)
        return int(self._top1(hidden[:, -1:])[0][0])

    def commit(self, block: list[int], start: int) -> int:
        self.run.forwards.append(("commit", start, len(block)))
        hidden = self.model(torch.tensor([block]), position_ids=self._positions(start, len(block)), cache=self.prefix,
                            start=start, mode=AttentionMode.BIDIRECTIONAL, write_kv=True)
        return int(self._top1(hidden[:, -1:])[0][0])

    def denoise(self, block: list[int], start: int, lo: int, hi: int, use_block_cache: bool,
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Predictions for block positions ``lo .. hi-1`` (shifted: position j from the state at j - 1)."""
        size = len(block)
        scratch = self.model.new_cache(start + size)
        scratch.k[:, :, :, :start] = self.prefix.k[:, :, :, :start]
        scratch.v[:, :, :, :start] = self.prefix.v[:, :, :, :start]
        whole = not use_block_cache or self.block_k is None or block[lo] == self.mask_id
        if whole:
            self.run.forwards.append(("block", start, size))
            hidden = self.model(torch.tensor([block]), position_ids=self._positions(start, size), cache=scratch,
                                start=start, mode=AttentionMode.BIDIRECTIONAL, write_kv=True)
            first = 0
        else:
            assert self.block_k is not None and self.block_v is not None
            self.run.forwards.append(("sub", start + lo, hi - lo))
            scratch.k[:, :, :, start:] = self.block_k
            scratch.v[:, :, :, start:] = self.block_v
            # The sub-block's K/V replace its part of the block cache; it sees the rest as cached.
            hidden = self.model(torch.tensor([block[lo:hi]]), position_ids=self._positions(start + lo, hi - lo),
                                cache=scratch, start=start + lo, mode=AttentionMode.BIDIRECTIONAL, write_kv=True,
                                kv_end=start + size)
            first = lo
        if use_block_cache:
            self.block_k = scratch.k[:, :, :, start:].clone()
            self.block_v = scratch.v[:, :, :, start:].clone()
        top1, prob = self._top1(hidden)
        # The state at index i of this forward sits at block position first + i and predicts the next one.
        idx = np.maximum(np.arange(lo, hi) - 1 - first, 0)
        return top1[idx], prob[idx]


@torch.inference_mode()
def published_generate(model: VLAModel, prompt_ids: list[int], *, mask_id: int, end_id: int, block_size: int,
                       sub_block_size: int, threshold: float, max_new_tokens: int, use_block_cache: bool,
                       stale_block_cache: bool = False, softmax_dtype: str = "float32",
                       images: Sequence[npt.NDArray[np.uint8]] = ()) -> PublishedRun:
    """Decode ``prompt_ids`` (with its camera ``images``, if any) by the published rules (see the module
    docstring)."""
    if mask_id in prompt_ids:
        raise ValueError(f"the prompt holds the mask id {mask_id} at position {prompt_ids.index(mask_id)}")
    oracle = _Oracle(model, len(prompt_ids) + max_new_tokens + 2 * block_size, softmax_dtype, mask_id)
    run = oracle.run
    aligned = len(prompt_ids) // block_size * block_size
    if images:
        image_id = model.config.tokens.image
        if image_id is not None and image_id in prompt_ids[aligned:]:
            raise ValueError(f"image tokens lie past the prefill ({aligned} tokens, whole blocks of {block_size})")
        oracle.set_images(prompt_ids, images)
    start = aligned
    if aligned:
        seed = oracle.prefill(prompt_ids[:aligned])
    if aligned == len(prompt_ids):
        if seed == end_id:
            run.stop = "end"
            return run
        block, generated_from = [seed] + [mask_id] * (block_size - 1), 0
    else:
        tail = prompt_ids[aligned:]
        block, generated_from = tail + [mask_id] * (block_size - len(tail)), len(tail)
    while True:
        if not stale_block_cache:
            oracle.block_k = oracle.block_v = None
        for lo in range(0, block_size, sub_block_size):
            hi = lo + sub_block_size
            while mask_id in block[lo:hi]:
                masked = [j for j in range(lo, hi) if block[j] == mask_id]
                top1, prob = oracle.denoise(block, start, lo, hi, use_block_cache)
                conf = np.array([prob[j - lo] for j in masked])
                best = int(np.argmax(conf))
                for k, j in enumerate(masked):
                    if conf[k] > threshold or k == best:
                        block[j] = int(top1[j - lo])
                new = block[generated_from:]
                if end_id in new and mask_id not in new[: new.index(end_id)]:
                    run.tokens += new[: new.index(end_id)]
                    run.tokens, run.stop = run.tokens[:max_new_tokens], "end"
                    return run
        run.tokens += block[generated_from:]
        if len(run.tokens) >= max_new_tokens:
            run.tokens, run.stop = run.tokens[:max_new_tokens], "max_new_tokens"
            return run
        seed = oracle.commit(block, start)
        start, generated_from = start + block_size, 0
        block = [seed] + [mask_id] * (block_size - 1)
        if seed == end_id:
            run.stop = "end"
            return run

