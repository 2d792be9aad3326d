"""The block-diffusion adaptation objective (Fast-dLLM v2 / BD3-LM style) on the answer tokens.

Blocks sit at absolute slot multiples of ``block_size``, as at decode time, so the prompt's last
partial block is completed by the answer. One packed row per example holds the clean sequence
(block-causal, like the prefill and committed blocks of the decoder) and one noisy copy of the
blocks from the prompt's last block onwards per view. A noisy block sees the clean blocks before
it and, bidirectionally, itself; its 3-D positions are those of the clean tokens it copies.

Per block a mask ratio is drawn; the second view masks exactly the complement, so each answer
token is supervised once per pair. Prediction is shifted: the state at slot ``s - 1`` predicts
the token at ``s``. The first slot of a block is never masked (the decoder seeds it from the
committed previous block) and is supervised from the clean state before it. An auxiliary causal
pass over the clean sequence adds the next-token loss. Only answer tokens are supervised, each
weighted by its section, with null padding and template structure down-weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from ..vla.config import ModelConfig
from ..vla.model import VLAModel
from ..vla.modes import AttentionMode
from ..vla.rope_index import mrope_positions
from ..vla.vision import image_inputs
from .objective_config import ObjectiveConfig

CLEAN, PAD = 0, -1  # segment ids of a packed row; noisy view v is segment v + 1


@dataclass(frozen=True, eq=False)
class AnswerLayout:
    """Per answer token (scaffold then end token): section index into ``names`` and frozen flag."""

    names: tuple[str, ...]
    section_ids: npt.NDArray[np.int8]
    frozen: npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class TrainBatch:
    ids: torch.Tensor  # (B, T) prompt + answer + end-token tail, right-padded
    positions: torch.Tensor  # (3, B, T) M-RoPE positions
    weights: torch.Tensor  # (B, T) loss weight per slot; 0 on prompt and padding
    prompt_lens: list[int]
    lengths: list[int]  # multiples of the block size
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.ids.to(device), self.positions.to(device), self.weights.to(device), self.prompt_lens,
                          self.lengths, self.pixel_values.to(device), self.grid_thw.to(device))


@dataclass(frozen=True, eq=False)
class LossParts:
    total: torch.Tensor
    diffusion: torch.Tensor
    ar: torch.Tensor
    rows: torch.Tensor  # (N,) row and slot of each diffusion-supervised token
    slots: torch.Tensor
    predicted: torch.Tensor  # (N,) argmax token there


def token_weights(answer: npt.NDArray[np.int64], layout: AnswerLayout, null_id: int,
                  config: ObjectiveConfig) -> npt.NDArray[np.float32]:
    """Loss weight of each answer token: section weight, times the null / structure factors."""
    section = np.array([config.section_weights.get(n, 1.0) for n in layout.names], dtype=np.float32)
    w = section[layout.section_ids]
    w = np.where(answer == null_id, w * config.null_weight, w)
    w = np.where(layout.frozen, w * config.structure_weight, w)
    w[-1] = config.section_weights.get("end", 1.0)  # the end token closes the answer, never frozen filler
    return w.astype(np.float32)


def make_batch(images: Sequence[np.ndarray], prompts: Sequence[np.ndarray], answers: Sequence[np.ndarray],
               layout: AnswerLayout, model_config: ModelConfig, config: ObjectiveConfig) -> TrainBatch:
    block = model_config.diffusion.block_size
    tokens = model_config.tokens
    if model_config.vision is None or tokens.image is None:
        raise ValueError("block-diffusion VLA training needs a model with a vision tower")
    rows, weights, prompt_lens, lengths = [], [], [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        tail = -(len(prompt) + len(answer)) % block
        rows.append(np.concatenate((prompt, answer, np.full(tail, tokens.end))))
        w = token_weights(answer, layout, tokens.null, config)
        weights.append(np.concatenate((np.zeros(len(prompt), np.float32), w, np.full(tail, config.tail_weight))))
        prompt_lens.append(len(prompt))
        lengths.append(len(rows[-1]))
    width = max(lengths)
    pad = tokens.pad if tokens.pad is not None else tokens.end
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    w_t = torch.zeros(len(rows), width)
    for b, (row, w) in enumerate(zip(rows, weights, strict=True)):
        ids[b, :len(row)] = torch.from_numpy(row)
        w_t[b, :len(w)] = torch.from_numpy(w)
    pixels, grid = image_inputs(list(images), model_config.vision)
    positions = torch.from_numpy(mrope_positions(ids.numpy(), grid.numpy(), tokens.image,
                                                 model_config.vision.spatial_merge_size)[0])
    return TrainBatch(ids, positions, w_t, prompt_lens, lengths, pixels, grid)


def maskable(prompt_len: int, length: int, block_size: int) -> npt.NDArray[np.bool_]:
    """Answer slots a noisy view may mask: all but each block's first slot."""
    slots = np.arange(length)
    return (slots >= prompt_len) & (slots % block_size != 0)


def sample_views(prompt_len: int, length: int, block_size: int, config: ObjectiveConfig,
                 generator: torch.Generator) -> list[npt.NDArray[np.bool_]]:
    """Masked slots of each view: a ratio per block, then (if complementary) the exact complement."""
    can = maskable(prompt_len, length, block_size)
    first = np.zeros(length, dtype=np.bool_)
    lo, hi = config.mask_ratio
    for start in range(prompt_len // block_size * block_size, length, block_size):
        candidates = np.flatnonzero(can[start:start + block_size]) + start
        if not len(candidates):
            continue
        ratio = lo + (hi - lo) * float(torch.rand((), generator=generator))
        count = min(max(round(ratio * len(candidates)), 1), len(candidates))
        first[candidates[torch.randperm(len(candidates), generator=generator)[:count].numpy()]] = True
    return [first, can & ~first] if config.complementary else [first]


def pack_layout(prompt_len: int, length: int, block_size: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Slot and segment of each packed position: the clean row, then a noisy copy per view."""
    start = prompt_len // block_size * block_size
    noisy = np.arange(start, length)
    slots = np.concatenate([np.arange(length), *([noisy] * views)])
    segment = np.concatenate([np.full(length, CLEAN), *(np.full(len(noisy), v + 1) for v in range(views))])
    return slots, segment


def bd_attention_mask(slots: torch.Tensor, segment: torch.Tensor, block_size: int) -> torch.Tensor:
    """(L, L) boolean mask of a packed row (True = may attend); padding attends only to itself."""
    blk = torch.div(slots, block_size, rounding_mode="floor")
    qb, kb = blk[:, None], blk[None, :]
    qs, ks = segment[:, None], segment[None, :]
    clean_q = (qs == CLEAN) & (ks == CLEAN) & (kb <= qb)
    noisy_q = (qs > CLEAN) & (((ks == CLEAN) & (kb < qb)) | ((ks == qs) & (kb == qb)))
    pad = (qs == PAD) & torch.eye(len(slots), dtype=torch.bool, device=slots.device)
    return clean_q | noisy_q | pad


def _weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum() / weights.sum().clamp_min(1e-8)


@dataclass(frozen=True, eq=False)
class PackedRows:
    """Packed rows of a batch and where each diffusion-supervised token is read out."""

    slots: torch.Tensor  # (B, L) clean-sequence slot each packed position copies
    segment: torch.Tensor  # (B, L) CLEAN, noisy view + 1, or PAD
    masked: torch.Tensor  # (B, L) noisy positions given the mask token
    rows: torch.Tensor  # (N,) supervised token: its row ...
    targets: torch.Tensor  # (N,) ... its slot in the clean sequence ...
    pred_at: torch.Tensor  # (N,) ... and the packed position whose state predicts it


def pack_rows(prompt_lens: Sequence[int], lengths: Sequence[int], row_views: Sequence[Sequence[np.ndarray]],
              block: int) -> PackedRows:
    layouts = [pack_layout(p, n, block, len(v)) for p, n, v in zip(prompt_lens, lengths, row_views, strict=True)]
    width = max(len(s) for s, _ in layouts)
    slots = torch.zeros(len(layouts), width, dtype=torch.long)
    segment = torch.full((len(layouts), width), PAD, dtype=torch.long)
    masked = torch.zeros(len(layouts), width, dtype=torch.bool)
    rows: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    pred_at: list[np.ndarray] = []
    for b, ((s, g), views) in enumerate(zip(layouts, row_views, strict=True)):
        slots[b, :len(s)], segment[b, :len(g)] = torch.from_numpy(s), torch.from_numpy(g)
        length, start = lengths[b], prompt_lens[b] // block * block
        answer = np.arange(prompt_lens[b], length)
        for i, view in enumerate(views):
            offset = length + i * (length - start)  # packed index of this view's copy of slot ``start``
            masked[b, offset:offset + length - start] = torch.from_numpy(view[start:])
            supervised = np.flatnonzero(view)
            if i == 0:  # block starts of the answer, predicted from the clean state before them
                supervised = np.union1d(supervised, answer[answer % block == 0])
            rows.append(np.full(len(supervised), b))
            targets.append(supervised)
            pred_at.append(np.where(supervised % block == 0, supervised - 1, offset + supervised - 1 - start))
    return PackedRows(slots, segment, masked, *(torch.from_numpy(np.concatenate(x)).long()
                                                for x in (rows, targets, pred_at)))


def block_diffusion_loss(model: VLAModel, batch: TrainBatch, config: ObjectiveConfig, generator: torch.Generator,
                         views: Sequence[Sequence[npt.NDArray[np.bool_]]] | None = None) -> LossParts:
    """Weighted diffusion loss (+ ``ar_weight`` x causal loss); ``views[b]`` fixes row ``b``'s masks."""
    block = model.config.diffusion.block_size
    device = batch.ids.device
    clean = model.embed(batch.ids, model.encode_images(batch.pixel_values, batch.grid_thw))
    shapes = list(zip(batch.prompt_lens, batch.lengths, strict=True))
    row_views = [list(views[b]) if views is not None else sample_views(p, n, block, config, generator)
                 for b, (p, n) in enumerate(shapes)]
    packed = pack_rows(batch.prompt_lens, batch.lengths, row_views, block)
    slots, segment, masked = packed.slots.to(device), packed.segment.to(device), packed.masked.to(device)
    embeds = clean.gather(1, slots[..., None].expand(-1, -1, clean.shape[-1]))
    mask_embed = model.lm.embed_tokens.weight[model.config.tokens.mask].to(embeds.dtype)
    embeds = torch.where(masked[..., None], mask_embed, embeds)
    positions = batch.positions.gather(2, slots[None].expand(3, -1, -1))
    attn = torch.stack([bd_attention_mask(slots[b], segment[b], block) for b in range(len(shapes))])
    hidden = model(inputs_embeds=embeds, position_ids=positions, attn_mask=attn)
    r, sl = packed.rows.to(device), packed.targets.to(device)
    logits = model.logits(hidden[r, packed.pred_at.to(device)])
    diffusion = _weighted_ce(logits, batch.ids[r, sl], batch.weights[r, sl])
    ar = torch.zeros((), device=device)
    if config.ar_weight > 0:
        causal = model(inputs_embeds=clean, position_ids=batch.positions, mode=AttentionMode.CAUSAL)
        ar_logits = model.logits(causal[:, :-1])
        w = batch.weights[:, 1:]
        ar = _weighted_ce(ar_logits.reshape(-1, ar_logits.shape[-1]), batch.ids[:, 1:].reshape(-1), w.reshape(-1))
    total = diffusion + config.ar_weight * ar
    return LossParts(total, diffusion.detach(), ar.detach(), r, sl, logits.detach().argmax(-1))
