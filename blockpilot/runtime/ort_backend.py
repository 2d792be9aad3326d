"""The ONNX Runtime backend: the graphs of :func:`blockpilot.export.export_onnx` on the CPU, no torch.

The KV cache is two numpy arrays owned by the backend, ``(layers, 1, kv_heads, capacity, head_dim)`` in the
graph's cache dtype, allocated once. With the window I/O (:mod:`blockpilot.runtime.kv_window`) every forward runs
through one ``IOBinding``: the cache is bound in place (ONNX Runtime's CPU provider reads the numpy memory, no
copy), the graph gathers only the visible slots and returns only the window's ``k_new`` / ``v_new`` into
preallocated buffers, and a ``write_kv`` step writes those rows at ``start``; a draft step (``write_kv=False``)
writes nothing, and :meth:`OrtBackend.truncate` only moves the length. An export made before the window I/O
(whole-cache ``present_k`` / ``present_v`` outputs) still runs: the whole cache goes in and the returned present
replaces it on a committed step. Batch one and greedy only:
sampling and :meth:`OrtBackend.fork` with more than one row raise :class:`OrtUnsupportedError`.

Every frame is resized by the export's image policy to one of its exported sizes (one vision graph per size), by
the host-side image code every backend shares (:func:`blockpilot.vla.image.prompt_images`: numpy and Pillow, no
torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..formats.onnx_spec import KV_OUTPUTS, graph_has_typed_slots, kv_io, load_spec, vision_graphs
from ..vla.modes import AttentionMode
from ..vla.plans import ActionChunkSchema, DrivingSchema
from .backend import AllowedTokens, BackendError, TokenArray
from .graph_backend import GraphBackend, driving_model_files
from .kv_window import write_rows
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
        self._load_inputs(self.spec, root, vision="graph")
        self._image_encoder = self._encode if self._vision else None
        past = next(i for i in self.spec["lm_step"]["inputs"] if i["name"] == "past_k")
        self.kv_io = kv_io(self.spec)
        self._k = np.zeros(past["shape"], dtype=np.dtype(past["dtype"]))
        self._v = np.zeros(past["shape"], dtype=np.dtype(past["dtype"]))
        self.feed_observer: FeedObserver | None = None
        self.constrains_tokens = graph_has_typed_slots(self.spec)
        self.last_outputs: dict[str, npt.NDArray[Any]] = {}  # the last LM run's outputs (views, valid until the next)
        if self.kv_io == "window":
            self._binding = self._lm.io_binding()
            for name, cache in (("past_k", self._k), ("past_v", self._v)):  # bound once, read in place
                self._binding.bind_input(name, "cpu", 0, cache.dtype, list(cache.shape), cache.ctypes.data)
            window = (*self._k.shape[:3], self.capacity, self._k.shape[4])  # the largest window: T = capacity
            self._out: dict[str, npt.NDArray[Any]] = {
                "top1": np.zeros(self.capacity, np.int64), "prob": np.zeros(self.capacity, np.float32),
                "k_new": np.zeros(window, self._k.dtype), "v_new": np.zeros(window, self._v.dtype)}
            # The typed-slot inputs' defaults (allow everything), bound when a step has no ``allowed``.
            self._unconstrained = {"allowed_table": np.ones((1, self.vocab), np.bool_),
                                   "token_class": np.zeros((1, 1), np.int64)}

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
            "mode": np.array(AttentionMode(mode).id, dtype=np.int64),
            "past_k": self._k,
            "past_v": self._v,
        }
        if allowed is not None:  # typed slots: the graph masks its logits (export.typed_slots_graph)
            feeds["allowed_table"] = allowed.table
            feeds["token_class"] = np.ascontiguousarray(allowed.classes, dtype=np.int64)
        if self.feed_observer is not None:
            self.feed_observer(feeds)
        if self.kv_io == "full":  # an export before the window I/O: the whole cache in and out
            top1, prob, present_k, present_v = self._lm.run(["top1", "prob", *KV_OUTPUTS["full"]], feeds)
            self.last_outputs = {"top1": top1, "prob": prob, "present_k": present_k, "present_v": present_v}
            if commit:  # a draft (write_kv=False) leaves the cache as it was
                self._k, self._v = present_k, present_v
            return np.asarray(top1, dtype=np.int64), np.asarray(prob, dtype=np.float32)
        top1, prob, k_new, v_new = self._run_bound(feeds, embeds.shape[0])
        if commit:  # a draft (write_kv=False) leaves the cache as it was
            write_rows(self._k, k_new, start)
            write_rows(self._v, v_new, start)
        return top1.astype(np.int64)[None], prob.astype(np.float32)[None]

    def _run_bound(self, feeds: dict[str, npt.NDArray[Any]], t: int) -> tuple[npt.NDArray[Any], ...]:
        """One run over the binding: the window's inputs bound by address (their arrays outlive the run), the
        outputs written into the fronts of the preallocated buffers; returns views of them."""
        binding = self._binding
        if self.constrains_tokens and "allowed_table" not in feeds:  # a binding keeps the last table: the defaults
            feeds = {**feeds, **self._unconstrained}
        for name, value in feeds.items():
            if name not in ("past_k", "past_v"):
                if not value.flags.c_contiguous:
                    value = feeds[name] = np.ascontiguousarray(value)
                binding.bind_input(name, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
        shape = (*self._k.shape[:3], t, self._k.shape[4])
        outs = {"top1": self._out["top1"][:t], "prob": self._out["prob"][:t],
                "k_new": self._out["k_new"].reshape(-1)[: int(np.prod(shape))].reshape(shape),
                "v_new": self._out["v_new"].reshape(-1)[: int(np.prod(shape))].reshape(shape)}
        for name, array in outs.items():
            dims = [1, t] if name in ("top1", "prob") else list(shape)
            binding.bind_output(name, "cpu", 0, array.dtype, dims, array.ctypes.data)
        self._lm.run_with_iobinding(binding)
        self.last_outputs = outs
        return outs["top1"], outs["prob"], outs["k_new"], outs["v_new"]


def ort_planner(checkpoint_dir: str | Path, onnx_dir: str | Path, *, decoder: DecoderSettings | None = None,
                schema: DrivingSchema | ActionChunkSchema | None = None, threads: int = 1,
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
