"""What the ONNX Runtime and TensorRT backends share: both run the graphs of one export
(:func:`blockpilot.export.export_onnx`) at batch one, greedy, and differ only in how they execute them.

:class:`GraphInputs` is the host side of a forward: token embeddings looked up from ``embed_tokens.npy`` (or the
tied LM head's initializer, :mod:`blockpilot.formats.embedding_table`) with the
vision features written over the image tokens, Qwen2.5-VL's M-RoPE positions, and the ``start`` / ``key_end`` of
a step checked against the cache. :class:`GraphBackend` is the :class:`~blockpilot.runtime.backend.Backend`
surface over it (prefill, step, fork, truncate, the cache length and rope delta); a subclass supplies how it runs
the vision graph on one image's patches and the LM step itself. Torch-free (like
:mod:`blockpilot.formats.onnx_spec` and :mod:`blockpilot.vla.image`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from ..formats.embedding_table import EmbeddingError, EmbeddingTable
from ..formats.onnx_spec import spec_policy
from ..vla.image import prompt_images
from ..vla.modes import AttentionMode
from ..vla.rope_index import check_image_tokens, continuation_positions
from .backend import (
    AllowedTokens,
    BackendError,
    CacheFullError,
    PromptError,
    StepResult,
    TokenArray,
    check_tokens,
    prefill_length,
)

if TYPE_CHECKING:
    from ..vla.config import ModelConfig
    from ..vla.image_policy import ImagePolicy
    from ..vla.plans import DrivingSchema
    from ..vla.tokenizer import Tokenizer
    from .backend import Prompt, Sampling

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Grid = tuple[int, int, int]
Encode = Callable[[FloatArray, Grid], FloatArray]  # one image's patches and patch grid -> its features
Forward = Callable[[FloatArray, IntArray], tuple[TokenArray, FloatArray]]  # (T, hidden), (3, 1, T) -> top1, prob
# What a prompt with images hears when the backend has no vision model.
VISION_WORDS = {"graph": "the export has no vision graph", "engine": "the bundle has no vision engine"}


@dataclass(frozen=True)
class StepWindow:
    """A checked block step: its embeddings ``(T, hidden)``, positions ``(3, 1, T)``, the visible key end and the
    cache length after it is committed."""

    embeds: FloatArray
    positions: IntArray
    key_end: int
    committed_length: int


class GraphInputs:
    """Embeddings, positions and step checks for the export in ``onnx_dir`` (its ``spec``, already loaded).

    ``vision`` (``"graph"`` or ``"engine"``) only picks the words of the errors about images."""

    def __init__(self, spec: dict[str, Any], onnx_dir: str | Path, *, vision: str = "graph") -> None:
        self.spec = spec
        try:
            self.embed = EmbeddingTable(spec, onnx_dir)  # embed_tokens.npy, or a tied LM head's initializer
        except EmbeddingError as exc:
            from .plan_types import PlannerSetupError

            raise PlannerSetupError(str(exc)) from exc
        self.vocab, self.hidden, self.capacity = int(spec["vocab_size"]), int(spec["hidden_size"]), \
            int(spec["capacity"])
        image_id = spec.get("image_token_id")
        self.image_id = int(image_id) if image_id is not None else -1
        self._no_vision = VISION_WORDS[vision]
        # Any frame is resized by the export's policy to one of its exported sizes (blockpilot.vla.image_policy).
        self.policy: ImagePolicy | None = None if spec.get("vision") is None else \
            spec_policy(spec["vision"], str(Path(onnx_dir) / "onnx_spec.json"))

    def prefill(self, prompt: Prompt, n: int, encode: Encode | None, forward: Forward) -> tuple[StepResult, int]:
        """Run ``forward`` over the first ``n`` tokens of ``prompt`` (images encoded through ``encode``, ``None``
        where there is no vision model); returns the prefill's result and the prompt's rope delta."""
        stage: dict[str, float] = {}
        ids = prompt.token_ids
        embeds = self.embed[ids]
        if prompt.images:
            if self.policy is None or encode is None:
                raise PromptError(f"the prompt has images but {self._no_vision}")
            t0 = time.perf_counter()
            try:  # patches, image-token checks and M-RoPE positions: the one host-side implementation
                host = prompt_images(ids, prompt.images, self.policy, self.image_id, prefill=n)
            except ValueError as exc:
                raise PromptError(str(exc)) from exc
            features = [encode(p, g) for p, g in zip(host.patches, host.grids, strict=True)]
            stage["vision"] = (time.perf_counter() - t0) * 1e3
            embeds[ids == self.image_id] = np.concatenate(features).astype(np.float32, copy=False)
            positions, rope_delta = host.positions, host.rope_delta
        else:
            try:
                check_image_tokens(ids, self.image_id, [])
            except ValueError as exc:
                raise PromptError(str(exc)) from exc
            rope_delta = 0
            positions = continuation_positions(0, len(prompt), 0)
        if n == 0:
            return StepResult(np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.float32), None,
                              stage), rope_delta
        t0 = time.perf_counter()
        top1, prob = forward(embeds[:n], positions[..., :n])
        stage["prefill"] = (time.perf_counter() - t0) * 1e3
        return StepResult(top1[:, -1:], prob[:, -1:], None, stage), rope_delta

    def step(self, tokens: TokenArray, start: int, *, length: int, write_kv: bool, kv_end: int | None,
             rope_delta: int) -> StepWindow:
        """Check a step of ``tokens`` ``(1, T)`` at ``start`` over a cache holding ``length`` slots (the
        :meth:`blockpilot.runtime.backend.Backend.step` contract) and return its inputs."""
        arr = check_tokens(tokens, self.vocab, 1)
        t = arr.shape[1]
        if start < 0 or start > length:
            raise ValueError(f"step at slot {start} outside 0..{length}: the cache holds {length} slots "
                             "and a later start would leave a gap")
        end = start + t
        if kv_end is not None:
            if not write_kv or kv_end < end:
                raise ValueError(f"kv_end={kv_end} needs write_kv=True and kv_end >= start + tokens ({end})")
            if kv_end > length and kv_end > end:  # as the torch backend: kv_end may end the window
                raise ValueError(f"kv_end {kv_end} reaches past the valid cache ({length} slots)")
            end = kv_end
        if end > self.capacity:  # the graph writes the window into its present cache even for a draft
            raise CacheFullError(f"KV cache write of {end - start} token(s) at slot {start} exceeds capacity "
                                 f"{self.capacity}")
        return StepWindow(self.embed[arr[0]], continuation_positions(start, t, rope_delta), end,
                          max(start + t, kv_end or 0))


class GraphBackend(ABC):
    """The :class:`~blockpilot.runtime.backend.Backend` methods of a backend over an export's graphs.

    A subclass sets :attr:`_inputs` and :attr:`_image_encoder` (``None`` without a vision model) and implements
    :meth:`_forward`; its class attributes name it in errors: sampling and ``fork(n > 1)`` raise
    :attr:`unsupported` saying ``"... on the <backend_name> backend ...: <rollouts_note>"``.
    """

    backend_name: ClassVar[str]
    rollouts_note: ClassVar[str]
    unsupported: ClassVar[type[BackendError]]
    _inputs: GraphInputs
    _image_encoder: Encode | None
    max_batch = 1  # batch one: fork(n > 1) raises
    capacity_fix = "re-export the bundle with a larger --max-prompt-tokens (or --cameras)"
    # Whether step(allowed=...) reaches the graph (typed-slot inputs, export.typed_slots_graph); a subclass sets it.
    constrains_tokens = False
    _length = 0
    _rope_delta = 0

    @property
    def capacity(self) -> int:
        """Cache slots of the export (its graphs' fixed cache size)."""
        return self._inputs.capacity

    @property
    def image_policy(self) -> ImagePolicy | None:
        """How this export resizes frames (to one of its vision graphs' sizes); ``None`` without vision."""
        return self._inputs.policy

    @abstractmethod
    def _forward(self, embeds: FloatArray, positions: IntArray, start: int, key_end: int, mode: AttentionMode, *,
                 commit: bool, graph: bool, allowed: AllowedTokens | None = None) -> tuple[TokenArray, FloatArray]:
        """Run the LM step on ``embeds`` ``(T, hidden)`` at ``positions`` ``(3, 1, T)``; keep the present cache
        when ``commit``. ``graph``: a block step (which a backend may replay from a CUDA graph), not a prefill.
        ``allowed``: the typed-slot mask (only passed where :attr:`constrains_tokens`)."""

    @property
    def length(self) -> int:
        """Valid cache slots (the graphs hold the rest as stale, masked values)."""
        return self._length

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        n = prefill_length(prompt, length, self.capacity)
        self._length = 0
        result, self._rope_delta = self._inputs.prefill(
            prompt, n, self._image_encoder,
            lambda embeds, positions: self._forward(embeds, positions, 0, n, mode, commit=True, graph=False))
        self._length = n
        return result

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        if sampling is not None:
            raise self.unsupported(f"sampled decoding on the {self.backend_name} backend: {self.rollouts_note}")
        if allowed is not None and not self.constrains_tokens:
            raise self.unsupported(f"typed value slots on the {self.backend_name} backend: this export's lm_step "
                                   "has no allowed_table / token_class inputs (export it again)")
        window = self._inputs.step(tokens, start, length=self._length, write_kv=write_kv, kv_end=kv_end,
                                   rope_delta=self._rope_delta)
        if allowed is not None:
            allowed.check(1, window.embeds.shape[0], self._inputs.vocab)
        top1, prob = self._forward(window.embeds, window.positions, start, window.key_end, mode, commit=write_kv,
                                   graph=True, **({"allowed": allowed} if allowed is not None else {}))
        if write_kv:
            self._length = window.committed_length
        return StepResult(top1, prob)

    def fork(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"fork({n}) needs at least one row")
        if n > 1:
            raise self.unsupported(f"fork({n}) on the {self.backend_name} backend (batch one only): "
                                   f"{self.rollouts_note}")

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"truncate({length}) outside 0..{self._length}")
        self._length = length


def driving_model_files(model_dir: str | Path,
                        schema: DrivingSchema | None = None) -> tuple[ModelConfig, Tokenizer, DrivingSchema]:
    """Config, tokenizer and driving schema (``schema``, else the directory's own) of a checkpoint directory or a
    bundle's ``model/``, no weights read: what a planner over exported graphs needs besides them. Raises
    :class:`~blockpilot.runtime.plan_types.PlannerSetupError` naming what is missing or wrong."""
    from ..vla.config import ConfigError
    from ..vla.hf_config import load_config
    from ..vla.plans import DrivingSchema
    from ..vla.schema_io import load_schema
    from ..vla.tokenizer import Tokenizer
    from .plan_types import PlannerSetupError

    try:
        config = load_config(model_dir)
        tokenizer = Tokenizer.from_file(model_dir, config.tokens)
        loaded = load_schema(model_dir) if schema is None else schema
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise PlannerSetupError(str(exc)) from exc
    if not isinstance(loaded, DrivingSchema):
        raise PlannerSetupError(f"{model_dir}: the checkpoint answers in the {type(loaded).__name__} layout; the "
                                "Planner plans driving")
    return config, tokenizer, loaded
