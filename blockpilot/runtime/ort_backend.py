"""The ONNX Runtime backend: the graphs of :func:`blockpilot.export.export_onnx` on the CPU, no torch.

The KV cache is two numpy arrays owned by the backend, ``(layers, 1, kv_heads, capacity, head_dim)``.
Every forward feeds the whole cache to ``lm_step.onnx`` and gets it back with the window written
at ``start``; a ``write_kv`` step keeps that present cache, a draft step (``write_kv=False``)
drops it, and :meth:`OrtBackend.truncate` only moves the length. Batch one and greedy only:
sampling and :meth:`OrtBackend.fork` with more than one row raise :class:`OrtUnsupportedError`.

Every frame is resized by the export's image policy to one of its exported sizes (one vision graph per size);
torch is imported only for that resize (:func:`blockpilot.formats.onnx_io.image_patches`), which a frame already
at an exported size never needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..formats.onnx_io import MODE_IDS, graph_has_typed_slots, load_spec, vision_graphs
from ..vla.modes import AttentionMode
from ..vla.plans import DrivingSchema
from .backend import AllowedTokens, BackendError, TokenArray
from .graph_backend import GraphBackend, GraphInputs, driving_model_files
from .plan_types import DecoderSettings, PlannerSetupError
from .planner import Planner

ROLLOUTS_NEED_TORCH = "rollouts need the torch backend for now"
FeedObserver = Callable[[Mapping[str, npt.NDArray[Any]]], None]


class OrtUnsupportedError(BackendError):
    """A call the ONNX Runtime backend does not implement yet (sampling, forked rows)."""


class OrtBackend(GraphBackend):
    """Implements :class:`blockpilot.runtime.backend.Backend` over ``vision.onnx`` and ``lm_step.onnx``
    (prefill / step / fork / truncate: :class:`~blockpilot.runtime.graph_backend.GraphBackend`).

    ``threads`` sets ONNX Runtime's intra-op thread count (1: single-threaded, for timings).
    :attr:`feed_observer`, when set, is called with the feeds of every LM-step run just before it runs (the
    arrays are the backend's own and are not written afterwards; copy what you keep past the next step).
    """

    backend_name = "ONNX Runtime"
    rollouts_note = ROLLOUTS_NEED_TORCH
    unsupported = OrtUnsupportedError

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
        # The typed-slot inputs carry defaults (initializers listed as inputs), which ONNX Runtime reports as a
        # warning on every session; errors still print.
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self._lm = ort.InferenceSession(str(root / self.spec["lm_step"]["file"]), options, providers=providers)
        vision = self.spec.get("vision")
        # One session per exported vision graph, by its patch grid.
        self._vision = {} if vision is None else {
            tuple(int(x) for x in g["grid_thw"]): ort.InferenceSession(str(root / g["file"]), options,
                                                                       providers=providers)
            for g in vision_graphs(vision)}
        self._inputs = GraphInputs(self.spec, root, vision="graph")
        self._image_encoder = self._encode if self._vision else None
        shape = next(i["shape"] for i in self.spec["lm_step"]["inputs"] if i["name"] == "past_k")
        self._k = np.zeros(shape, dtype=np.float32)
        self._v = np.zeros(shape, dtype=np.float32)
        self.feed_observer: FeedObserver | None = None
        self.constrains_tokens = graph_has_typed_slots(self.spec)

    def _encode(self, patches: npt.NDArray[np.float32], grid: tuple[int, int, int]) -> npt.NDArray[np.float32]:
        session = self._vision.get(grid)
        if session is None:  # the policy resizes to exported sizes only: a spec whose policy and graphs disagree
            raise PlannerSetupError(f"no vision graph for the patch grid {grid}; the vision graphs were exported "
                                    f"for {sorted(self._vision)}")
        features: npt.NDArray[np.float32] = session.run(["features"], {"patches": patches})[0]
        return features

    def _forward(self, embeds: npt.NDArray[np.float32], positions: npt.NDArray[np.int64], start: int, key_end: int,
                 mode: AttentionMode, *, commit: bool, graph: bool,
                 allowed: AllowedTokens | None = None) -> tuple[TokenArray, npt.NDArray[np.float32]]:
        # Plain run() measured a little faster here than IOBinding into double buffers (and there is no graph
        # to replay: ``graph`` is the TensorRT backend's).
        feeds: dict[str, npt.NDArray[Any]] = {
            "inputs_embeds": np.ascontiguousarray(embeds[None], dtype=np.float32),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "start": np.array(start, dtype=np.int64),
            "key_end": np.array(key_end, dtype=np.int64),
            "mode": np.array(MODE_IDS[AttentionMode(mode).value], dtype=np.int64),
            "past_k": self._k,
            "past_v": self._v,
        }
        if allowed is not None:  # typed slots: the graph masks its logits (export.typed_slots_graph)
            feeds["allowed_table"] = allowed.table
            feeds["token_class"] = np.ascontiguousarray(allowed.classes, dtype=np.int64)
        if self.feed_observer is not None:
            self.feed_observer(feeds)
        top1, prob, present_k, present_v = self._lm.run(["top1", "prob", "present_k", "present_v"], feeds)
        if commit:  # a draft (write_kv=False) leaves the cache as it was
            self._k, self._v = present_k, present_v
        return np.asarray(top1, dtype=np.int64), np.asarray(prob, dtype=np.float32)


def ort_planner(checkpoint_dir: str | Path, onnx_dir: str | Path, *, decoder: DecoderSettings | None = None,
                schema: DrivingSchema | None = None, threads: int = 1,
                max_prompt_tokens: int | None = None) -> Planner:
    """A :class:`Planner` on :class:`OrtBackend`: config, tokenizer and schema from ``checkpoint_dir``
    (no weights are read), graphs from ``onnx_dir``. The cache capacity is the export's; ``max_prompt_tokens``
    may lower the prompt budget, and asking more than the export holds is a :class:`PlannerSetupError`."""
    config, tokenizer, schema = driving_model_files(checkpoint_dir, schema)
    try:
        backend = OrtBackend(onnx_dir, threads=threads)
    except (FileNotFoundError, ValueError) as exc:
        raise PlannerSetupError(str(exc)) from exc
    settings = decoder or DecoderSettings()
    if settings.name == "rollouts":
        raise PlannerSetupError(f"the rollouts decoder on the ONNX Runtime backend: {ROLLOUTS_NEED_TORCH}")
    return Planner(backend, config, tokenizer, decoder=settings, schema=schema, prompt_limit=max_prompt_tokens)
