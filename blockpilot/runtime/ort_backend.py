"""The ONNX Runtime backend: the graphs of :func:`blockpilot.export.export_onnx` on the CPU, no torch.

The KV cache is two numpy arrays owned by the backend, ``(layers, 1, kv_heads, capacity, head_dim)``.
Every forward feeds the whole cache to ``lm_step.onnx`` and gets it back with the window written
at ``start``; a ``write_kv`` step keeps that present cache, a draft step (``write_kv=False``)
drops it, and :meth:`OrtBackend.truncate` only moves the length. Batch one and greedy only:
sampling and :meth:`OrtBackend.fork` with more than one row raise :class:`OrtUnsupportedError`.

Torch is imported only to resize an image that is not already at the processor's target size
(:func:`blockpilot.formats.onnx_io.image_patches`); the shipped cameras never need it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..formats.onnx_io import (
    MODE_IDS,
    continuation_positions_np,
    image_patches,
    load_spec,
    mrope_positions_np,
)
from ..vla.modes import AttentionMode
from ..vla.plans import DrivingSchema
from .backend import (
    BackendError,
    CacheFullError,
    Prompt,
    PromptError,
    Sampling,
    StepResult,
    TokenArray,
    check_tokens,
    prefill_length,
)
from .plan_types import DecoderSettings, PlannerSetupError
from .planner import Planner

ROLLOUTS_NEED_TORCH = "rollouts need the torch backend for now"


class OrtUnsupportedError(BackendError):
    """A call the ONNX Runtime backend does not implement yet (sampling, forked rows)."""


class OrtBackend:
    """Implements :class:`blockpilot.runtime.backend.Backend` over ``vision.onnx`` and ``lm_step.onnx``.

    ``threads`` sets ONNX Runtime's intra-op thread count (1: single-threaded, for timings).
    """

    def __init__(self, onnx_dir: str | Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        root = Path(onnx_dir)
        self.spec: dict[str, Any] = load_spec(root)
        if self.spec.get("variant", "decomposed") != "decomposed":
            raise PlannerSetupError(f"{root}: the {self.spec['variant']} graphs are for TensorRT (custom "
                              f"{self.spec.get('plugin', {}).get('op_type', 'plugin')} nodes); ONNX Runtime runs "
                              "the decomposed export")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self._lm = ort.InferenceSession(str(root / self.spec["lm_step"]["file"]), options, providers=providers)
        vision = self.spec.get("vision")
        self._vision = None if vision is None else ort.InferenceSession(str(root / vision["file"]), options,
                                                                        providers=providers)
        self._embed: npt.NDArray[np.float32] = np.load(root / self.spec["embed_file"]).astype(np.float32)
        shape = next(i["shape"] for i in self.spec["lm_step"]["inputs"] if i["name"] == "past_k")
        self._k = np.zeros(shape, dtype=np.float32)
        self._v = np.zeros(shape, dtype=np.float32)
        self._vocab = int(self.spec["vocab_size"])
        image_id = self.spec.get("image_token_id")
        self._image_id = int(image_id) if image_id is not None else -1
        self._length = 0
        self._rope_delta = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return int(self.spec["capacity"])

    @property
    def max_batch(self) -> int:
        return 1

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        n = prefill_length(prompt, length, self.capacity)
        self._length = 0
        stage: dict[str, float] = {}
        ids = prompt.token_ids
        is_image = ids == self._image_id
        if prompt.images:
            t0 = time.perf_counter()
            features, grids = self._encode_images(prompt.images, int(is_image.sum()))
            if bool(is_image[n:].any()):
                raise PromptError(f"image tokens lie past the prefill length {n}; prefill through the images")
            stage["vision"] = (time.perf_counter() - t0) * 1e3
            assert self.spec["vision"] is not None
            try:
                positions, self._rope_delta = mrope_positions_np(ids, grids, self._image_id,
                                                                 int(self.spec["vision"]["spatial_merge_size"]))
            except ValueError as exc:
                raise PromptError(str(exc)) from exc
            embeds = self._embed[ids]
            embeds[is_image] = features
        else:
            if is_image.any():
                raise PromptError(f"the prompt holds {int(is_image.sum())} image tokens but no images were given")
            self._rope_delta = 0
            positions = continuation_positions_np(0, len(prompt), 0)
            embeds = self._embed[ids]
        if n == 0:
            return StepResult(np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.float32), None, stage)
        t0 = time.perf_counter()
        top1, prob = self._forward(embeds[None, :n], positions[..., :n], 0, n, mode, commit=True)
        stage["prefill"] = (time.perf_counter() - t0) * 1e3
        self._length = n
        return StepResult(top1[:, -1:], prob[:, -1:], None, stage)

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None) -> StepResult:
        if sampling is not None:
            raise OrtUnsupportedError(f"sampled decoding on the ONNX Runtime backend: {ROLLOUTS_NEED_TORCH}")
        arr = check_tokens(tokens, self._vocab, 1)
        t = arr.shape[1]
        if start < 0 or start > self._length:
            raise ValueError(f"step at slot {start} outside 0..{self._length}: the cache holds {self._length} slots "
                             "and a later start would leave a gap")
        end = start + t
        if kv_end is not None:
            if not write_kv or kv_end < end:
                raise ValueError(f"kv_end={kv_end} needs write_kv=True and kv_end >= start + tokens ({end})")
            if kv_end > self._length:
                raise ValueError(f"kv_end {kv_end} reaches past the valid cache ({self._length} slots)")
            end = kv_end
        # The graph writes the window into its present cache even for a draft, so it must fit.
        if end > self.capacity:
            raise CacheFullError(f"KV cache write of {end - start} token(s) at slot {start} exceeds capacity "
                                 f"{self.capacity}")
        positions = continuation_positions_np(start, t, self._rope_delta)
        top1, prob = self._forward(self._embed[arr], positions, start, end, mode, commit=write_kv)
        if write_kv:
            self._length = max(start + t, kv_end or 0)
        return StepResult(top1, prob)

    def fork(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"fork({n}) needs at least one row")
        if n > 1:
            raise OrtUnsupportedError(f"fork({n}) on the ONNX Runtime backend (batch one only): {ROLLOUTS_NEED_TORCH}")

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"truncate({length}) outside 0..{self._length}")
        self._length = length

    def _encode_images(self, images: tuple[npt.NDArray[np.uint8], ...],
                       n_image_tokens: int) -> tuple[npt.NDArray[np.float32], list[tuple[int, int, int]]]:
        vision = self.spec.get("vision")
        if vision is None or self._vision is None:
            raise PromptError("the prompt has images but the export has no vision graph")
        expected = tuple(vision["grid_thw"])
        grids: list[tuple[int, int, int]] = []
        patch_sets = []
        merge = int(vision["spatial_merge_size"])
        counts = []
        for i, image in enumerate(images):
            patches, grid = image_patches(image, int(vision["patch_size"]), merge, int(vision["temporal_patch_size"]))
            if grid != expected:
                raise PromptError(f"image {i} ({image.shape[0]}x{image.shape[1]}) makes a {grid} patch grid; the "
                                  f"vision graph was exported for {expected} (image size {vision['image_hw']})")
            grids.append(grid)
            patch_sets.append(patches)
            counts.append(grid[0] * grid[1] * grid[2] // (merge * merge))
        if n_image_tokens != sum(counts):
            raise PromptError(f"the prompt holds {n_image_tokens} image tokens but its {len(images)} image(s) "
                              f"need {sum(counts)}")
        features = [self._vision.run(["features"], {"patches": patches})[0] for patches in patch_sets]
        return np.concatenate(features).astype(np.float32, copy=False), grids

    def _forward(self, embeds: npt.NDArray[np.float32], positions: npt.NDArray[np.int64], start: int, key_end: int,
                 mode: AttentionMode, *, commit: bool) -> tuple[TokenArray, npt.NDArray[np.float32]]:
        # Plain run() measured a little faster here than IOBinding into double buffers.
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "start": np.array(start, dtype=np.int64),
            "key_end": np.array(key_end, dtype=np.int64),
            "mode": np.array(MODE_IDS[AttentionMode(mode).value], dtype=np.int64),
            "past_k": self._k,
            "past_v": self._v,
        }
        top1, prob, present_k, present_v = self._lm.run(["top1", "prob", "present_k", "present_v"], feeds)
        if commit:  # a draft (write_kv=False) leaves the cache as it was
            self._k, self._v = present_k, present_v
        return np.asarray(top1, dtype=np.int64), np.asarray(prob, dtype=np.float32)


def ort_planner(checkpoint_dir: str | Path, onnx_dir: str | Path, *, decoder: DecoderSettings | None = None,
                schema: DrivingSchema | None = None, threads: int = 1) -> Planner:
    """A :class:`Planner` on :class:`OrtBackend`: config, tokenizer and schema from ``checkpoint_dir``
    (no weights are read), graphs from ``onnx_dir``. The cache capacity is the export's."""
    from ..vla.config import ConfigError
    from ..vla.hf_config import load_config
    from ..vla.schema_io import load_schema
    from ..vla.tokenizer import Tokenizer

    try:
        config = load_config(checkpoint_dir)
        tokenizer = Tokenizer.from_file(checkpoint_dir, config.tokens)
        if schema is None:
            loaded = load_schema(checkpoint_dir)
            if not isinstance(loaded, DrivingSchema):
                raise PlannerSetupError(f"{checkpoint_dir}: the checkpoint answers in the "
                                        f"{type(loaded).__name__} layout; the Planner plans driving")
            schema = loaded
        backend = OrtBackend(onnx_dir, threads=threads)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise PlannerSetupError(str(exc)) from exc
    settings = decoder or DecoderSettings()
    if settings.name == "rollouts":
        raise PlannerSetupError(f"the rollouts decoder on the ONNX Runtime backend: {ROLLOUTS_NEED_TORCH}")
    return Planner(backend, config, tokenizer, decoder=settings, schema=schema)
