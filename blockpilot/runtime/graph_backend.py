"""What the ONNX Runtime and TensorRT backends share: both run the graphs of one export
(:func:`blockpilot.export.export_onnx`) at batch one, greedy, and differ only in how they execute them.

:class:`GraphBackend` is the :class:`~blockpilot.runtime.backend.Backend` surface (prefill, step, fork, truncate,
the cache length and rope delta) and the host side of a forward: token embeddings looked up from
``embed_tokens.npy`` (or the tied LM head's initializer, :mod:`blockpilot.formats.embedding_table`) with the vision
features written over the image tokens, and Qwen2.5-VL's M-RoPE positions; step, fork and truncate arguments are
checked by the shared contract of :mod:`blockpilot.runtime.backend`. A subclass supplies how it runs the vision
graph on one image's patches and the LM step itself. Torch-free (like :mod:`blockpilot.formats.onnx_spec` and
:mod:`blockpilot.vla.image`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
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
    PromptError,
    StepResult,
    TokenArray,
    check_fork,
    check_step,
    check_truncate,
    prefill_length,
)

if TYPE_CHECKING:
    from ..vla.config import ModelConfig
    from ..vla.image_policy import ImagePolicy
    from ..vla.plans import ActionChunkSchema, DrivingSchema
    from ..vla.tokenizer import Tokenizer
    from .backend import Prompt, Sampling

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Grid = tuple[int, int, int]
Encode = Callable[[FloatArray, Grid], FloatArray]  # one image's patches and patch grid -> its features
# What a prompt with images hears when the backend has no vision model.
VISION_WORDS = {"graph": "the export has no vision graph", "engine": "the bundle has no vision engine"}


class GraphBackend(ABC):
    """The :class:`~blockpilot.runtime.backend.Backend` methods of a backend over an export's graphs.

    A subclass calls :meth:`_load_inputs` with its export's spec, sets :attr:`_image_encoder` (``None`` without a
    vision model) and implements :meth:`_forward`; its class attributes name it in errors: sampling and
    ``fork(n > 1)`` raise :attr:`unsupported` saying ``"... on the <backend_name> backend ...: <rollouts_note>"``.
    """

    backend_name: ClassVar[str]
    rollouts_note: ClassVar[str]
    unsupported: ClassVar[type[BackendError]]
    _image_encoder: Encode | None
    max_batch = 1  # batch one: fork(n > 1) raises
    capacity_fix = "re-export the bundle with a larger --max-prompt-tokens (or --cameras)"
    # Whether step(allowed=...) reaches the graph (typed-slot inputs, export.typed_slots_graph); a subclass sets it.
    constrains_tokens = False
    _length = 0
    _rope_delta = 0

    def _load_inputs(self, spec: dict[str, Any], onnx_dir: str | Path, *, vision: str = "graph") -> None:
        """Embeddings, sizes and image policy of the export in ``onnx_dir`` (its ``spec``, already loaded).
        ``vision`` (``"graph"`` or ``"engine"``) only picks the words of the errors about images."""
        try:
            self.embed = EmbeddingTable(spec, onnx_dir)  # embed_tokens.npy, or a tied LM head's initializer
        except EmbeddingError as exc:
            from .plan_types import PlannerSetupError

            raise PlannerSetupError(str(exc)) from exc
        self.vocab, self.hidden = int(spec["vocab_size"]), int(spec["hidden_size"])
        self._capacity = int(spec["capacity"])
        image_id = spec.get("image_token_id")
        self.image_id = int(image_id) if image_id is not None else -1
        self._vision_spec: dict[str, Any] | None = spec.get("vision")
        self._no_vision = VISION_WORDS[vision]
        # Any frame is resized by the export's policy to one of its exported sizes (blockpilot.vla.image_policy).
        self.image_policy: ImagePolicy | None = None if self._vision_spec is None else \
            spec_policy(self._vision_spec, str(Path(onnx_dir) / "onnx_spec.json"))

    @property
    def capacity(self) -> int:
        """Cache slots of the export (its graphs' fixed cache size)."""
        return self._capacity

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
        stage: dict[str, float] = {}
        ids = prompt.token_ids
        embeds = self.embed[ids]
        if prompt.images:
            encode = self._image_encoder
            if self.image_policy is None or encode is None:
                raise PromptError(f"the prompt has images but {self._no_vision}")
            t0 = time.perf_counter()
            try:  # patches, image-token checks and M-RoPE positions: the one host-side implementation
                host = prompt_images(ids, prompt.images, self.image_policy, self.image_id, prefill=n)
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
        self._rope_delta = rope_delta
        if n == 0:
            return StepResult(np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.float32), None, stage)
        t0 = time.perf_counter()
        top1, prob = self._forward(embeds[:n], positions[..., :n], 0, n, mode, commit=True, graph=False)
        stage["prefill"] = (time.perf_counter() - t0) * 1e3
        self._length = n
        return StepResult(top1[:, -1:], prob[:, -1:], None, stage)

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        if sampling is not None:
            raise self.unsupported(f"sampled decoding on the {self.backend_name} backend: {self.rollouts_note}")
        if allowed is not None and not self.constrains_tokens:
            raise self.unsupported(f"typed value slots on the {self.backend_name} backend: this export's lm_step "
                                   "has no allowed_table / token_class inputs (export it again)")
        checked = check_step(tokens, start, length=self._length, capacity=self.capacity, batch=1,
                             vocab_size=self.vocab, write_kv=write_kv, kv_end=kv_end, allowed=allowed)
        t = checked.tokens.shape[1]
        top1, prob = self._forward(self.embed[checked.tokens[0]], continuation_positions(start, t, self._rope_delta),
                                   start, checked.key_end, mode, commit=write_kv, graph=True,
                                   **({"allowed": allowed} if allowed is not None else {}))
        if write_kv:
            self._length = checked.key_end
        return StepResult(top1, prob)

    def fork(self, n: int) -> None:
        if n > self.max_batch:
            raise self.unsupported(f"fork({n}) on the {self.backend_name} backend (batch one only): "
                                   f"{self.rollouts_note}")
        check_fork(n, rows=1, max_batch=self.max_batch)

    def truncate(self, length: int) -> None:
        check_truncate(length, self._length)
        self._length = length


def driving_model_files(model_dir: str | Path, schema: DrivingSchema | ActionChunkSchema | None = None,
                        ) -> tuple[ModelConfig, Tokenizer, DrivingSchema | ActionChunkSchema]:
    """Config, tokenizer and schema (``schema``, else the directory's own: a driving or an action-chunk layout) of
    a checkpoint directory or a bundle's ``model/``, no weights read: what a planner over exported graphs needs
    besides them. Raises :class:`~blockpilot.runtime.plan_types.PlannerSetupError` naming what is missing or wrong."""
    from ..vla.config import ConfigError
    from ..vla.hf_config import load_config
    from ..vla.plans import ActionChunkSchema, DrivingSchema
    from ..vla.schema_io import load_schema
    from ..vla.tokenizer import Tokenizer
    from .plan_types import PlannerSetupError

    try:
        config = load_config(model_dir)
        tokenizer = Tokenizer.from_file(model_dir, config.tokens)
        loaded = load_schema(model_dir) if schema is None else schema
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise PlannerSetupError(str(exc)) from exc
    if not isinstance(loaded, (DrivingSchema, ActionChunkSchema)):
        raise PlannerSetupError(f"{model_dir}: the checkpoint answers in the {type(loaded).__name__} layout; a "
                                "planner over exported graphs plans driving or action chunks")
    return config, tokenizer, loaded
