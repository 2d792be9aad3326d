"""The LM-head epilogue of one step as a Triton kernel: logits -> top-1 id and its softmax probability.

:func:`top1_prob` reduces ``logits`` ``(rows, V)`` to ``(top1, prob)`` without a float32 copy of the logits or
a softmax tensor: the grid is ``(row, vocab split)``; each program walks its split of the vocabulary in tiles
and keeps a running max, the index of its first occurrence and the running sum of ``exp(x - max)`` (float32),
skipping ``mask_id`` (an input marker, never an answer). A few torch ops then merge the splits. The
probability of the top-1 token is ``1 / sum(exp(x - max))``, what ``softmax(x).max()`` gives.

:func:`blockpilot.runtime.cuda_lm.top1_prob_ref` is the same in plain torch (the torch backend's math).
Without a GPU, set ``TRITON_INTERPRET=1`` before ``triton`` is imported to run the kernel on CPU tensors
(slow; for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT_SIZE = 4096  # vocabulary entries per program
TILE = 1024  # entries per load


@triton.jit
def _top1_split_kernel(LOGITS, MAX, SUM, ARG, stride_row, V, MASK_ID, SPLITS, SPLIT: tl.constexpr,
                       TILE_V: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = LOGITS + row * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    arg = tl.zeros((), tl.int32)
    lo = split * SPLIT
    for t0 in range(0, SPLIT, TILE_V):
        offs = lo + t0 + tl.arange(0, TILE_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.where(offs == MASK_ID, float("-inf"), x)
        tile_max = tl.max(x, 0)
        tile_arg = (tl.argmax(x, 0) + lo + t0).to(tl.int32)
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite seen yet: the sum stays 0
        s = s * tl.math.exp(m - m_safe) + tl.sum(tl.math.exp(x - m_safe), 0)
        arg = tl.where(tile_max > m, tile_arg, arg)  # strict: the first maximum wins
        m = m_new
    out = row * SPLITS + split
    tl.store(MAX + out, m)
    tl.store(SUM + out, s)
    tl.store(ARG + out, arg)


def top1_prob(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top1 int64, prob float32)``, each ``logits.shape[:-1]``, of ``logits`` ``(..., V)`` (fp16, bf16 or
    fp32, last dim contiguous) with ``mask_id`` excluded; ties go to the lowest id."""
    shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    splits = triton.cdiv(vocab, SPLIT_SIZE)
    part_max = torch.empty(rows, splits, dtype=torch.float32, device=flat.device)
    part_sum = torch.empty_like(part_max)
    part_arg = torch.empty(rows, splits, dtype=torch.int32, device=flat.device)
    if rows:
        _top1_split_kernel[(rows, splits)](flat, part_max, part_sum, part_arg, flat.stride(0), vocab, int(mask_id),
                                           splits, SPLIT=SPLIT_SIZE, TILE_V=TILE)
    best, which = part_max.max(dim=1, keepdim=True)  # first split holding the maximum
    total = (part_sum * torch.exp(part_max - best)).sum(dim=1)
    top1 = part_arg.gather(1, which).squeeze(1).to(torch.int64)
    return top1.reshape(shape), (1.0 / total).reshape(shape)

