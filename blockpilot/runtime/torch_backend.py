"""The torch backend: a :class:`VLAModel` with one static KV cache, on CPU or CUDA."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..vla.image import prompt_images, vision_policy
from ..vla.image_policy import ImagePolicy
from ..vla.kv_cache import CacheCapacityError
from ..vla.model import VLAModel, rope_continuation
from ..vla.modes import AttentionMode
from ..vla.rope_index import check_image_tokens
from .backend import (
    AllowedTokens,
    CacheFullError,
    Prompt,
    PromptError,
    Sampling,
    StepResult,
    TokenArray,
    check_fork,
    check_step,
    check_truncate,
    prefill_length,
)
from .confidence import check_softmax_dtype, top1_probability
from .sampling import gumbel_keys


def prompt_embeddings(
        model: VLAModel, prompt: Prompt, n: int, stage: dict[str, float],
        policy: ImagePolicy | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The prompt's input embeddings ``(1, L, hidden)`` on the model's device with the image features written
    over the image tokens, plus the M-RoPE positions and rope delta of an image prompt (``None``, ``None``
    without images). Images are resized by ``policy`` (default: the processor defaults); patches, positions and
    the image-token checks are :func:`blockpilot.vla.image.prompt_images`, as on every backend. The vision
    tower's time goes into ``stage["vision"]`` (ms)."""
    config, device = model.config, next(model.parameters()).device
    ids = torch.from_numpy(prompt.token_ids).to(device)[None]
    image_id = config.tokens.image if config.tokens.image is not None else -1
    if not prompt.images:
        try:
            check_image_tokens(prompt.token_ids, image_id, [])
        except ValueError as exc:
            raise PromptError(str(exc)) from exc
        return model.lm.embed_tokens(ids), None, None
    vision = config.vision
    if vision is None or model.visual is None:
        raise PromptError("the prompt has images but the model has no vision tower")
    t0 = time.perf_counter()
    try:
        host = prompt_images(prompt.token_ids, prompt.images, vision_policy(vision, policy=policy), image_id,
                             prefill=n)
    except ValueError as exc:
        raise PromptError(str(exc)) from exc
    patches = torch.from_numpy(np.concatenate(host.patches)).to(device)
    features = model.encode_images(patches, torch.from_numpy(host.grid_thw).to(device))
    stage["vision"] = (time.perf_counter() - t0) * 1e3
    positions = torch.from_numpy(host.positions).to(device)
    delta = torch.tensor([host.rope_delta], dtype=torch.long, device=device)
    return model.embed(ids, features), positions, delta


class TorchBackend:
    """Implements :class:`blockpilot.runtime.backend.Backend` over the plain-``nn.Module`` model.

    The cache is allocated once for ``capacity`` slots and ``max_batch`` rows; :meth:`fork` copies
    row 0 into the first ``n`` rows of a second preallocated cache, so no plan allocates.
    :attr:`image_policy` (the checkpoint's, set by the planner) resizes the prompt's images.
    An :class:`AllowedTokens` table is copied to the device once (kept while the same array comes back).
    """

    image_policy: ImagePolicy | None = None
    constrains_tokens = True  # step(allowed=...) masks the logits on the device

    def __init__(self, model: VLAModel, capacity: int, max_batch: int = 1, *, softmax_dtype: str = "float32") -> None:
        if capacity <= 0 or max_batch <= 0:
            raise ValueError(f"capacity and max_batch must be positive, got {capacity}, {max_batch}")
        check_softmax_dtype(softmax_dtype)
        # "model": confidences from a softmax in the model's dtype, as the published generate (see runtime.confidence)
        self.softmax_dtype = softmax_dtype
        self.model = model.eval()
        self.config = model.config
        self._single = model.new_cache(capacity, 1)
        self._multi = model.new_cache(capacity, max_batch) if max_batch > 1 else None
        self._cache = self._single
        self._length = 0
        self._batch = 1
        p = next(model.parameters())
        self.device = p.device
        self.dtype = str(p.dtype).removeprefix("torch.")  # what the weights and the KV cache hold
        # Multimodal RoPE: a generated token at slot s has position s + delta (delta from the prompt).
        self._rope_delta = torch.zeros(1, dtype=torch.long, device=self.device)
        self._table: tuple[object, torch.Tensor] | None = None  # (host table, its device copy)

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self._single.capacity

    @property
    def max_batch(self) -> int:
        return self._multi.batch if self._multi is not None else 1

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        n = prefill_length(prompt, length, self.capacity)
        self._cache, self._batch, self._length = self._single, 1, 0
        stage: dict[str, float] = {}
        embeds, positions, delta = prompt_embeddings(self.model, prompt, n, stage, self.image_policy)
        self._rope_delta = delta if delta is not None else torch.zeros(1, dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        if positions is None and self.config.lm.mrope_section is not None:
            positions = rope_continuation(0, len(prompt), self._rope_delta)
        pos = positions[..., :n] if positions is not None else None
        if n == 0:
            empty = np.zeros((1, 0), dtype=np.int64)
            return StepResult(empty, np.zeros((1, 0), dtype=np.float32), None, stage)
        hidden = self.model(inputs_embeds=embeds[:, :n], position_ids=pos, cache=self._cache, start=0, mode=mode,
                            block_size=self.config.diffusion.block_size)
        result = self._predict(hidden[:, -1:], None, None)
        stage["prefill"] = (time.perf_counter() - t0) * 1e3
        self._length = n
        return StepResult(result.top1, result.prob, None, stage)

    @torch.inference_mode()
    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        checked = check_step(tokens, start, length=self._length, capacity=self.capacity, batch=self._batch,
                             vocab_size=self.config.lm.vocab_size, write_kv=write_kv, kv_end=kv_end,
                             sampling=sampling, allowed=allowed)
        arr, t = checked.tokens, checked.tokens.shape[1]
        ids = torch.from_numpy(arr).to(self.device)
        pos = None
        if self.config.lm.mrope_section is not None:
            pos = rope_continuation(start, t, self._rope_delta.expand(self._batch))
        try:
            hidden = self.model(ids, position_ids=pos, cache=self._cache, start=start, mode=mode,
                                block_size=self.config.diffusion.block_size, write_kv=write_kv, kv_end=kv_end)
        except CacheCapacityError as exc:
            raise CacheFullError(str(exc)) from exc
        if write_kv:
            self._length = checked.key_end
        slots = torch.arange(start, start + t, device=self.device)
        return self._predict(hidden, sampling, slots, allowed)

    def fork(self, n: int) -> None:
        check_fork(n, rows=self._batch, max_batch=self.max_batch)
        if n == 1 or self._multi is None:
            return
        end = self._length
        with torch.inference_mode():
            self._multi.k[:, :n, :, :end] = self._single.k[:, :1, :, :end]
            self._multi.v[:, :n, :, :end] = self._single.v[:, :1, :, :end]
        self._cache = self._multi.rows(n)
        self._batch = n

    def truncate(self, length: int) -> None:
        check_truncate(length, self._length)
        self._length = length

    def _device_table(self, table: object) -> torch.Tensor:
        if self._table is None or self._table[0] is not table:
            self._table = (table, torch.from_numpy(np.array(table, dtype=np.bool_)).to(self.device))
        return self._table[1]

    def _predict(self, hidden: torch.Tensor, sampling: Sampling | None, slots: torch.Tensor | None,
                 allowed: AllowedTokens | None = None) -> StepResult:
        # Top-1, its probability and the optional sample are reduced on the device; only
        # (batch, tokens) values travel to the host.
        logits = self.model.logits(hidden).float()
        # The mask token is an input marker, never an answer: no decoder may predict it.
        logits[..., self.config.tokens.mask] = float("-inf")
        if allowed is not None:  # typed slots: what a position may not hold never wins, nor is drawn
            rows = self._device_table(allowed.table)[torch.from_numpy(allowed.classes).to(self.device)]
            logits = logits.masked_fill(~rows, float("-inf"))
        prob, top1 = top1_probability(logits, self.model.lm.embed_tokens.weight.dtype, self.softmax_dtype)
        sampled = None
        if sampling is not None:
            if len(sampling.seeds) != logits.shape[0] or slots is None:
                raise ValueError(f"sampling needs {logits.shape[0]} seeds (one per row), got {len(sampling.seeds)}")
            seeds = torch.tensor(sampling.seeds, dtype=torch.int64, device=logits.device)
            keys = gumbel_keys(seeds, slots, logits.shape[-1])
            sampled = (logits / sampling.temperature + keys).argmax(-1).cpu().numpy().astype(np.int64)
        return StepResult(top1.cpu().numpy().astype(np.int64), prob.cpu().numpy().astype(np.float32), sampled)
