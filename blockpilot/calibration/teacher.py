"""Teacher-forced calibration: one forward per sample over prompt plus answer, in the packed
block-diffusion layout that holds both attention patterns the decoders run.

A packed row (as block-diffusion training packs one, :mod:`blockpilot.train.objective`):

* the **clean** sequence, prompt then answer, under the decoder's commit mask: causal (the prefill and
  the scaffold decoders' verify forwards), or block-causal for the block decoder with bidirectional
  commits (Fast-dLLM v2);
* one **noisy** copy of every draft window of the answer: the window's value slots hold the mask token
  (structure tokens and the window's first token stay, as the decoder seeds them), each window sees the
  clean slots before it and itself bidirectionally, at the positions of the clean tokens it copies.
  The windows are the decoder's own: the scaffold's section blocks for the scaffold decoders, absolute
  blocks of ``block_size`` for the block decoder.

So every quantizer sees the prompt's causal prefill, the answer's causal verify and the masked
bidirectional drafts in one forward, instead of a full decode (30-180 forwards). The answer comes from
the sample's ground truth rendered through the schema (:mod:`.answers`); where there is none (no
future in the recording, a non-driving schema) from one greedy decode of the full-precision model,
made when the loop is built, before any quantizer is inserted.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..progress_bars import live_bar
from ..runtime.backend import Prompt
from ..runtime.decoders import section_blocks
from ..runtime.plan_types import for_model
from ..runtime.planner import Planner
from ..runtime.torch_backend import prompt_embeddings
from ..vla.masks import attention_mask
from ..vla.model import VLAModel, rope_continuation
from ..vla.modes import AttentionMode
from .answers import sample_truth_tokens
from .loop import planner_model
from .sets import CalibrationError, CalibrationSet

CLEAN = -1  # window id of the clean sequence's positions
ANSWER_SOURCES = ("truth", "greedy")


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Positions of one packed row: ``slots[i]`` the clean slot position ``i`` copies, ``window[i]`` its
    draft window (:data:`CLEAN` for the clean sequence), ``mask`` ``(T, T)`` (True = may attend)."""

    slots: torch.Tensor
    window: torch.Tensor
    mask: torch.Tensor
    prompt_length: int
    answer_length: int

    @property
    def clean_queries(self) -> int:
        return int((self.window == CLEAN).sum())

    @property
    def draft_queries(self) -> int:
        return int((self.window != CLEAN).sum())


def draft_windows(planner: Planner, prompt_length: int, answer: int) -> list[tuple[int, int]]:
    """The windows ``[a, b)`` (positions of an ``answer``-token answer) the planner's decoder drafts
    bidirectionally."""
    s = planner.settings
    assert s.block_size is not None
    if s.name == "block" or answer != len(planner.scaffold):
        # Absolute blocks: the answer completes the prompt's last partial block first.
        edges = [0, *range(-prompt_length % s.block_size or s.block_size, answer, s.block_size), answer]
        return [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    return list(section_blocks(planner.scaffold, 0, answer, s.block_size))


def clean_mode(planner: Planner) -> AttentionMode:
    """The clean sequence's mask: block-causal where the decoder commits blocks bidirectionally."""
    s = planner.settings
    if s.name == "block" and AttentionMode(s.commit_mode) is AttentionMode.BIDIRECTIONAL:
        return AttentionMode.BLOCK
    return AttentionMode.CAUSAL


def packed_layout(prompt_length: int, answer_length: int, windows: Sequence[tuple[int, int]],
                  mode: AttentionMode, block_size: int) -> PackedLayout:
    """The packed row of a prompt of ``prompt_length`` and an answer of ``answer_length`` tokens, with one
    noisy copy per draft window (answer positions ``[a, b)``)."""
    n = prompt_length + answer_length
    for a, b in windows:
        if not 0 <= a < b <= answer_length:
            raise CalibrationError(f"draft window [{a}, {b}) lies outside the answer's {answer_length} tokens")
    parts = [torch.arange(n)] + [torch.arange(prompt_length + a, prompt_length + b) for a, b in windows]
    slots = torch.cat(parts)
    window = torch.cat([torch.full((n,), CLEAN)] + [torch.full((b - a,), w) for w, (a, b) in enumerate(windows)])
    starts = torch.tensor([prompt_length + a for a, _ in windows] or [0], dtype=torch.long)
    clean = window == CLEAN
    clean_pair = clean[:, None] & clean[None, :] & attention_mask(slots, slots, mode, block_size)
    first = starts[window.clamp_min(0)]  # the first slot of each noisy query's window
    noisy_pair = ~clean[:, None] & ((clean[None, :] & (slots[None, :] < first[:, None]))
                                    | (window[:, None] == window[None, :]))
    return PackedLayout(slots, window, clean_pair | noisy_pair, prompt_length, answer_length)


def noisy_ids(answer: npt.NDArray[np.int64], frozen: npt.NDArray[np.bool_], windows: Sequence[tuple[int, int]],
              mask_id: int) -> npt.NDArray[np.int64]:
    """Each window as the decoder drafts it: first token and structure kept, value slots masked."""
    out = []
    for a, b in windows:
        w = np.where(frozen[a:b], answer[a:b], mask_id)
        w[0] = answer[a]
        out.append(w)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass
class TeacherStats:
    """What the teacher-forced loop ran, summed over every call; ``answers``: where each answer came from."""

    calls: int = 0
    forwards: int = 0
    packed_tokens: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    causal_queries: int = 0
    draft_queries: int = 0
    windows: int = 0
    seconds: float = 0.0
    answer_seconds: float = 0.0
    answer_sources: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ANSWER_SOURCES, 0))
    answer_parse_failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "teacher", **{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()}}


@dataclass(frozen=True, eq=False)
class TeacherSample:
    sample_id: str
    prompt: Prompt
    answer: npt.NDArray[np.int64]
    source: str  # "truth" or "greedy"


class TeacherForwardLoop:
    """``loop(model)`` runs one packed forward per calibration sample through ``planner``'s model (the one
    being quantized, else :class:`CalibrationError`). Answers are made at construction, with the model as
    it is then (build the loop before quantizing). ``answers="greedy"`` decodes every answer instead of
    rendering the ground truth."""

    def __init__(self, planner: Planner, calib: CalibrationSet, *, answers: str = "truth",
                 progress: bool = False) -> None:
        if answers not in ANSWER_SOURCES:
            raise CalibrationError(f"answers must be one of {ANSWER_SOURCES}, got {answers!r}")
        if planner.settings.name == "rollouts":
            raise CalibrationError("teacher-forced calibration needs a greedy decoder (scaffold, ar or block) for "
                                   "the answers it decodes; build the planner with one")
        self.planner = planner
        model = planner_model(planner)
        if not isinstance(model, VLAModel):
            raise CalibrationError(f"teacher-forced calibration runs a VLAModel, not {type(model).__name__}")
        self.model = model
        self.progress = progress
        self.stats = TeacherStats()
        if not calib.samples:
            raise CalibrationError("the calibration set is empty")
        block = planner.settings.block_size
        assert block is not None
        self.block_size = block
        self.mode = clean_mode(planner)
        t0 = time.perf_counter()
        self.samples = [self._sample(s, answers) for s in calib.samples]
        self.stats.answer_seconds = time.perf_counter() - t0

    def _sample(self, sample: Any, answers: str) -> TeacherSample:
        planner = self.planner
        obs = for_model(sample.observation(), planner.config)
        prompt, _ = planner.prompt(obs)
        ids = sample_truth_tokens(planner.scaffold, sample) if answers == "truth" else None
        source = "truth"
        if ids is None:
            with torch.inference_mode():
                plan = planner.plan(obs)
            ids, source = np.asarray(plan.tokens[0], dtype=np.int64), "greedy"
            self.stats.answer_parse_failures += plan.error is not None
        self.stats.answer_sources[source] += 1
        return TeacherSample(sample.sample_id, prompt, ids, source)

    def layout(self, sample: TeacherSample) -> PackedLayout:
        windows = draft_windows(self.planner, len(sample.prompt), len(sample.answer))
        return packed_layout(len(sample.prompt), len(sample.answer), windows, self.mode, self.block_size)

    def forward(self, sample: TeacherSample) -> tuple[torch.Tensor, PackedLayout]:
        """The packed forward of one sample: final hidden states ``(1, T, hidden)`` and the layout."""
        model, planner = self.model, self.planner
        device = next(model.parameters()).device
        layout = self.layout(sample)
        p, a = len(sample.prompt), len(sample.answer)
        windows = draft_windows(planner, p, a)
        stage: dict[str, float] = {}
        prompt_embeds, positions, delta = prompt_embeddings(model, sample.prompt, p, stage, planner.image_policy)
        frozen = np.asarray(planner.scaffold.frozen, dtype=np.bool_)
        if len(frozen) != a:
            frozen = np.zeros(a, dtype=np.bool_)
        tail = np.concatenate([sample.answer, noisy_ids(sample.answer, frozen, windows, planner.config.tokens.mask)])
        tail_embeds = model.lm.embed_tokens(torch.from_numpy(tail).to(device)[None])
        embeds = torch.cat([prompt_embeds, tail_embeds], dim=1)
        slots = layout.slots.to(device)
        if planner.config.lm.mrope_section is not None:
            deltas = delta if delta is not None else torch.zeros(1, dtype=torch.long, device=device)
            answer_pos = rope_continuation(p, a, deltas)
            full = torch.cat([positions if positions is not None else rope_continuation(0, p, deltas),
                              answer_pos], dim=-1)
            pos = full[..., slots]
        else:
            pos = slots[None]
        hidden = model(inputs_embeds=embeds, position_ids=pos, attn_mask=layout.mask.to(device))
        if _head_quantized(model):  # the protected head normally has no quantizer: skip its vocab-wide matmul
            model.logits(hidden)
        return hidden, layout

    def __call__(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            raise CalibrationError(
                f"the teacher-forced loop was made for the planner's model ({type(self.model).__name__} at "
                f"{id(self.model):#x}) but was called with another module ({type(model).__name__} at "
                f"{id(model):#x}); quantize planner.backend.model itself")
        stats = self.stats
        stats.calls += 1
        t0 = time.perf_counter()
        bar = live_bar(len(self.samples), "calibration", unit="forward", enabled=None if self.progress else False)
        with torch.inference_mode(), contextlib.closing(bar):
            for sample in self.samples:
                _, layout = self.forward(sample)
                stats.forwards += 1
                stats.packed_tokens += int(layout.slots.numel())
                stats.prompt_tokens += layout.prompt_length
                stats.answer_tokens += layout.answer_length
                stats.causal_queries += layout.clean_queries
                stats.draft_queries += layout.draft_queries
                stats.windows += int(layout.window.max()) + 1
                bar.set_postfix_str(f"{sample.sample_id}: {layout.slots.numel()} tokens ({sample.source} answer)",
                                    refresh=False)
                bar.update()
        stats.seconds += time.perf_counter() - t0


def _head_quantized(model: torch.nn.Module) -> bool:
    head = getattr(getattr(model, "lm", None), "lm_head", None)
    return head is not None and any(name.endswith("_quantizer") and getattr(m, "is_enabled", False)
                                    for name, m in head.named_modules())


def make_teacher_loop(planner: Planner, calib: CalibrationSet, *, answers: str = "truth",
                      progress: bool = False) -> TeacherForwardLoop:
    """A teacher-forced ``forward_loop(model)`` for ``modelopt.torch.quantization.quantize``; build it before
    quantizing (greedy answers decode with the model as it is), read ``loop.stats`` after."""
    return TeacherForwardLoop(planner, calib, answers=answers, progress=progress)
