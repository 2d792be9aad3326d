"""The TensorRT backend: a bundle's ``vision`` and ``lm_step`` engines on the GPU, batch one, greedy (the same
contract as :class:`blockpilot.runtime.ort_backend.OrtBackend` over the same graphs; sampling and ``fork(n>1)``
raise :class:`TrtUnsupportedError`).

Memory. Every device buffer comes from one :class:`~blockpilot.runtime.cuda_memory.CudaMemory` and is allocated
once, at the largest shape the engine's optimization profile admits (T = the cache capacity); a step with fewer
tokens uses the front of each buffer. All execution contexts are created with user-managed device memory and
share one scratch allocation (they never run at the same time: one stream). Token embeddings are looked up on
the host from the bundle's ``embed_tokens.npy`` (image features written over the image tokens) and staged in
pinned memory; only ``top1``/``prob``, ``(1, T)``, come back per forward.

KV cache. One cache pair (``past_k``/``past_v``, in the engine's dtype for them: float16 in fp16 and fp8
engines, float32 in fp32 ones and older bundles; :attr:`TrtBackend.cache_dtype`, :attr:`TrtBackend.cache_bytes`)
lives in two fixed device buffers that the engine reads in place; it gathers only the visible slots and
writes only the window's new K/V (``k_new``/``v_new``, ``(layers, 1, kv_heads, T, head_dim)``, the window I/O
of :mod:`~blockpilot.runtime.kv_window`) into fixed output buffers. A committed step (``write_kv=True``) then
copies those rows into the cache at ``start``, one strided device copy per tensor (``layers * kv_heads`` rows
of ``T * head_dim`` elements of the cache's size); a draft (``write_kv=False``) copies nothing, so the cache
stays as it was. Addresses are set once, never per call.
Engines built before the window I/O (``present_k``/``present_v`` outputs: two whole caches ping-ponged per step)
are refused with :class:`~blockpilot.runtime.kv_window.StaleExportError` saying to re-export.

``key_end``: in decomposed and native engines a shape tensor (``ICudaEngine.is_shape_inference_io``: it feeds
the ``Range`` of visible keys), so its address points at pinned host memory, set once, and TensorRT reads the
value on the host at enqueue time; in plugin engines it only reaches the plugins (``Cast`` + ``Reshape`` to
int32 ``(1,)``), an ordinary device input uploaded like ``start`` (:func:`~blockpilot.runtime.trt_engine.lm_layout`
decides from the engine). Plugin engines (``TrtBackend(plugin=True)``, selected by the artifact's variant)
have the same network I/O as decomposed ones: each plugin writes the window into its layer's slice of the cache
(a tensor inside the network, ``Gather`` of ``past_k``), and the graph returns the window's K/V like the others.

CUDA graphs. A captured graph freezes the input shapes, a host value of ``key_end`` (hence the kernels' grid
sizes) and every tensor address, so graphs are keyed by ``(T, key_end, 0)`` (``key_end`` as ``-1`` where
it lives on the device, which a graph does not freeze): the denoising drafts and the commit of one block share
a key and replay. A block step's key is captured at first sight, a one-token step's at its second (an AR
decoder never repeats one where ``key_end`` is in the key), each in its own execution context (an enqueue may
stage shape-dependent parameters that a later enqueue with other shapes would overwrite), which runs that call
eagerly and is then captured; at most ``cuda_graphs`` graphs are kept, least recently used dropped. Prefills
change T every plan and always run eagerly. Capture is off when ``cuda_graphs=0``, through pycuda, or when
TensorRT reports the context not stream-capturable (TensorRT-RTX engines need to be built to use
application-provided memory); an engine whose output shapes depend on data cannot use fixed buffers at all and
is refused. :attr:`TrtBackend.graph_note` says which applies.

Typed value slots. An engine with the ``allowed_table`` / ``token_class`` inputs constrains
(:attr:`constrains_tokens`): the table is uploaded once per table object into a fixed buffer whose row 0 allows
everything, and each forward writes its classes into a fixed buffer before the engine runs or its graph replays
(:mod:`blockpilot.runtime.trt_slots`), so the graph keys above still hold. An engine built before those inputs
runs unconstrained and the plans' stats say ``constrained: false``.

Vision. One static engine per exported camera size (patch grid); every frame is resized by the export's policy
restricted to the sizes with an engine, and its grid picks the engine (:mod:`blockpilot.runtime.trt_vision`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..formats.bundle import Artifact, Bundle
from ..formats.onnx_spec import load_spec
from ..vla.modes import AttentionMode
from .backend import AllowedTokens, BackendError, TokenArray
from .cuda_memory import CudaMemory, CudaUnavailableError
from .graph_backend import GraphBackend, driving_model_files
from .plan_types import DecoderSettings, PlannerSetupError
from .planner import Planner
from .trt_engine import TrtEngine, TrtStepGraphs, bind, enqueue
from .trt_slots import SlotFeed, has_typed_slots
from .trt_vision import VisionEngineArg, VisionEngines, bundle_vision_engines, engine_paths, engine_policy

PRECISION_ORDER = ("fp8", "fp16", "fp32")
VARIANT_ORDER = ("native", "decomposed", "plugin")  # fused attention first; the Python plugin last


class TrtUnsupportedError(BackendError):
    """A call the TensorRT backend does not implement (sampling, forked rows)."""


class EngineSelectionError(PlannerSetupError):
    """No engine of the bundle runs on this GPU (or none matches the requested precision / variant)."""


def normalize_cc(value: str | tuple[int, int]) -> str:
    """``"8.9"`` from ``"8.9"``, ``"sm89"``, ``"sm_89"``, ``"89"`` or ``(8, 9)``."""
    if isinstance(value, tuple):
        return f"{int(value[0])}.{int(value[1])}"
    text = value.strip().lower().removeprefix("sm").lstrip("_")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if not text.isdigit() or len(text) < 2:
        raise ValueError(f"not a compute capability: {value!r}")
    return f"{int(text[:-1])}.{int(text[-1])}"


def select_engines(bundle: Bundle, compute_capability: str | tuple[int, int], *, precision: str | None = None,
                   variant: str | None = None) -> dict[str, Artifact]:
    """The engine per role (``lm_step``, and ``vision`` when the bundle has a vision graph) built for this GPU's
    compute capability, preferring fp8 > fp16 > fp32 and, for ``lm_step``, native > decomposed > plugin attention;
    ``precision`` / ``variant`` (the latter for ``lm_step``) pin one. Raises :class:`EngineSelectionError`
    listing what the bundle holds when none fits."""
    cc = normalize_cc(compute_capability)
    roles = ["lm_step"] + (["vision"] if any(a.role == "vision" for a in bundle.artifacts) else [])
    chosen: dict[str, Artifact] = {}
    for role in roles:
        fits = [a for a in bundle.engines() if a.role == role and a.sm is not None and _same_cc(a.sm, cc)
                and precision in (None, a.precision) and (role != "lm_step" or variant in (None, a.variant))]
        if not fits:
            asked = "".join(f", {k} {v}" for k, v in (("precision", precision), ("variant", variant)) if v)
            raise EngineSelectionError(f"{bundle.path}: no {role} engine for compute capability {cc}{asked}; "
                                       f"the bundle holds {describe_engines(bundle)}")
        chosen[role] = min(fits, key=lambda a: (_rank(PRECISION_ORDER, a.precision), _rank(VARIANT_ORDER, a.variant)))
    return chosen


def describe_engines(bundle: Bundle) -> str:
    engines = [f"{a.role} {a.precision} {a.variant} for {a.target} (sm {a.sm})" for a in bundle.engines()]
    return "; ".join(engines) if engines else "no engines (export with --target to build some)"


def _same_cc(a: str, b: str) -> bool:
    try:
        return normalize_cc(a) == normalize_cc(b)
    except ValueError:
        return False


def _rank(order: tuple[str, ...], value: str) -> int:
    return order.index(value) if value in order else len(order)


def engine_flavor(artifact: Artifact) -> str:
    """The TensorRT module that deserializes ``artifact`` (engines of TensorRT-RTX need ``tensorrt_rtx``)."""
    return "tensorrt_rtx" if "tensorrt_rtx" in artifact.tools else "tensorrt"


class TrtBackend(GraphBackend):
    """Implements :class:`blockpilot.runtime.backend.Backend` over TensorRT engines (see the module docstring;
    prefill / step / fork / truncate: :class:`~blockpilot.runtime.graph_backend.GraphBackend`).

    ``onnx_dir`` holds the export's ``onnx_spec.json`` and its token embedding table (``embed_tokens.npy``, or for a
    tied model the LM head initializer of its ``lm_step.onnx``); ``flavor`` is the module that
    built the engines (``tensorrt`` or ``tensorrt_rtx``); ``plugin``: the LM engine was built from the plugin
    graph (its plugin is registered before deserialization). ``memory`` is created here unless given;
    :meth:`close` closes it when it was created here or ``own_memory`` hands it over. ``cuda_graphs``: how many
    step graphs to keep (0: none). ``vision_engine``: one engine path (the first exported camera size's) or a
    mapping from each exported vision graph's patch grid to its engine.
    """

    backend_name = "TensorRT"
    rollouts_note = "rollouts need the torch backend"
    unsupported = TrtUnsupportedError

    def __init__(self, lm_engine: str | Path, onnx_dir: str | Path, *, vision_engine: VisionEngineArg = None,
                 memory: CudaMemory | None = None, own_memory: bool = False, flavor: str = "tensorrt",
                 plugin: bool = False, cuda_graphs: int = 4) -> None:
        self.memory = memory if memory is not None else CudaMemory()
        self._owns_memory = memory is None or own_memory
        try:
            self._setup(Path(lm_engine), Path(onnx_dir), vision_engine, flavor, plugin, cuda_graphs)
        except BaseException:
            self.close()
            raise

    def _setup(self, lm_path: Path, onnx_dir: Path, vision_engine: VisionEngineArg, flavor: str, plugin: bool,
               cuda_graphs: int) -> None:
        m = self.memory
        self.spec: dict[str, Any] = load_spec(onnx_dir)
        self._load_inputs(self.spec, onnx_dir, vision="engine")
        vision_paths = engine_paths(self.spec, vision_engine)
        if self.image_policy is not None and vision_paths:
            # Every frame is resized to a size with an engine (the ONNX Runtime backend's choice over its graphs).
            self.image_policy = engine_policy(self.image_policy, self.spec, list(vision_paths))
        cap = self.capacity
        engines = TrtEngine.load(flavor, [lm_path, *vision_paths.values()], m.compute_capability, plugin=plugin)
        lm = engines[0]
        self._lm = lm
        self.layout = layout = lm.lm_layout()
        if any(lm.aliased_input(n) for n in ("k_new", "v_new")):
            raise PlannerSetupError(f"{lm_path}: the engine aliases its k_new / v_new outputs to inputs; this backend "
                                    "copies the window's K/V from their own buffers (a draft must leave the cache as "
                                    "it was)")
        scratch = m.alloc("context scratch", max(e.scratch_bytes for e in engines))
        for engine in engines:
            engine.use_scratch(scratch)
        device_inputs = ["inputs_embeds", "position_ids", "start", "mode"]
        if not layout.key_end_on_host:  # plugin engines: key_end is data like start
            device_inputs.append("key_end")
        self._buf = {n: m.alloc(n, lm.nbytes(n, lm.max_shape(n))) for n in device_inputs}
        # Typed value slots (trt_slots): engines built with the inputs constrain; older ones run unconstrained.
        self._slots = SlotFeed(m, lm, cap, self.vocab) if has_typed_slots(lm) else None
        self.constrains_tokens = self._slots is not None
        self.max_slot_classes = None if self._slots is None else self._slots.max_classes
        self.cache_shape = cache = lm.max_shape("past_k")
        if len(cache) != 5 or cache[3] != cap or lm.max_shape("past_v") != cache:
            raise PlannerSetupError(f"{lm_path}: past_k / past_v of shapes {cache} / {lm.max_shape('past_v')}; the "
                                    f"export's cache is (layers, 1, kv_heads, {cap}, head_dim)")
        window = (*cache[:3], cap, cache[4])  # k_new / v_new at the largest window, T = capacity
        # The cache in the engine's dtype for past_k / past_v (fp16 engines since the fp16 cache I/O; fp32 in
        # fp32 engines and in fp16 engines built before it, which keep running).
        self.cache_dtype = np.dtype(layout.dtypes["past_k"])
        self._kv = {n: m.alloc(n, lm.nbytes(n, cache)) for n in ("past_k", "past_v")}
        self.cache_bytes = sum(b.nbytes for b in self._kv.values())  # K and V, every slot
        for buffer in self._kv.values():  # never read before written, but no stale NaN reaches a masked product
            m.memset(buffer)
        for name in ("top1", "prob"):  # (1, T): the export's spec, checked against the engine below
            self._buf[name] = m.alloc(name, lm.nbytes(name, (1, cap)))
        for name in ("k_new", "v_new"):
            self._buf[name] = m.alloc(name, lm.nbytes(name, window))
        self._staged = {n: m.pinned(1, layout.dtypes[n]) for n in ("start", "mode", "key_end")}
        self._contexts = [lm.context()]  # its addresses set once
        bind(self._contexts[0], self._addresses(), lm_path)
        self._set_shapes(self._contexts[0], cap, cap)
        for name in ("top1", "prob", "k_new", "v_new"):
            shape = tuple(int(d) for d in self._contexts[0].get_tensor_shape(name))
            if shape != ((1, cap) if name in ("top1", "prob") else window):
                raise PlannerSetupError(f"{lm_path}: output {name} has shape {shape} at T = capacity; fixed buffers "
                                        "(and CUDA graphs) need the export's output shapes, known from the inputs")
        if len({lm.kind(n) for n in ("past_k", "past_v", "k_new", "v_new")}) != 1:
            raise PlannerSetupError(f"{lm_path}: k_new / v_new are {lm.kind('k_new')} / {lm.kind('v_new')} and the "
                                    f"cache is {lm.kind('past_k')} / {lm.kind('past_v')}; the rows are copied as is, "
                                    "so all four need one type")
        self._shape_of: dict[int, int] = {}
        self._embeds_host = m.pinned((cap, self.hidden), layout.dtypes["inputs_embeds"])
        self._pos_host = m.pinned(3 * cap, layout.dtypes["position_ids"])
        self._top1_host, self._prob_host = m.pinned(cap, layout.dtypes["top1"]), m.pinned(cap, layout.dtypes["prob"])
        self.graphs = TrtStepGraphs(m, cuda_graphs)
        merge = int((self.spec.get("vision") or {}).get("spatial_merge_size", 1))
        self._vision = VisionEngines(m, dict(zip(vision_paths, engines[1:], strict=True)), merge) \
            if vision_paths else None
        self._image_encoder = None if self._vision is None else self._vision.encode
        self._length = self._rope_delta = 0

    @property
    def graph_note(self) -> str:
        """Why CUDA graphs are off, or ``""`` while they are on."""
        return self.graphs.note

    def close(self) -> None:
        """Drop contexts and engines, then free every buffer (closing the memory layer when it is ours)."""
        if "graphs" in self.__dict__:
            self.graphs.clear()
        vision = self.__dict__.get("_vision")
        if vision is not None:
            vision.close()
        for name in ("graphs", "_contexts", "_lm", "_vision"):  # contexts before engines
            self.__dict__.pop(name, None)
        if self._owns_memory:
            self.memory.close()

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forward(self, embeds: npt.NDArray[np.float32], positions: npt.NDArray[np.int64], start: int, key_end: int,
                 mode: AttentionMode, *, commit: bool, graph: bool,
                 allowed: AllowedTokens | None = None) -> tuple[TokenArray, npt.NDArray[np.float32]]:
        m, t, p = self.memory, embeds.shape[0], 0
        self._embeds_host[:t] = embeds
        self._pos_host[: 3 * t] = np.asarray(positions).reshape(-1)
        staged = self._staged
        staged["start"][0], staged["mode"][0] = start, AttentionMode(mode).id
        staged["key_end"][0] = key_end  # on the host: read when the work is enqueued
        m.upload(self._buf["inputs_embeds"], self._embeds_host[:t])
        m.upload(self._buf["position_ids"], self._pos_host[: 3 * t])
        for name in ("start", "mode", "key_end"):
            if name in self._buf:
                m.upload(self._buf[name], staged[name])
        if self._slots is not None:  # the window's classes (all 0 without ``allowed``) at their fixed address
            self._slots.feed(allowed, t)
        key = (t, key_end if self.layout.key_end_on_host else -1, p)
        if not (graph and self.graphs.enabled and self.graphs.replay(key)):
            fresh = graph and self.graphs.wanted(key)  # a repeated key: its own context, run eagerly, then captured
            context = self._lm.context() if fresh else self._contexts[p]
            if fresh:
                bind(context, self._addresses(), self._lm.path)
            if fresh or self._shape_of.get(p) != t:
                self._set_shapes(context, t, key_end)
                if not fresh:
                    self._shape_of[p] = t
            enqueue(context, m.stream, f"lm_step T={t} key_end={key_end}")
            if fresh:
                self.graphs.capture(key, context)
        if commit:  # the window's rows into the cache at start; a draft leaves the cache as it was
            self._commit_rows(start, t)
        m.download(self._top1_host[:t], self._buf["top1"])
        m.download(self._prob_host[:t], self._buf["prob"])
        m.synchronize()
        top1 = self._top1_host[:t].astype(np.int64)[None]
        return top1, self._prob_host[:t].astype(np.float32)[None]

    def _commit_rows(self, start: int, t: int) -> None:
        """Queue the copy of ``k_new`` / ``v_new`` ``(layers, 1, kv_heads, t, head_dim)`` into the cache at slots
        ``start .. start + t``: per (layer, head) one row of ``t * head_dim`` elements."""
        layers, _, heads, cap, dim = self.cache_shape
        for new, cache in (("k_new", "past_k"), ("v_new", "past_v")):
            item = np.dtype(self.layout.dtypes[cache]).itemsize
            self.memory.copy_2d(self._kv[cache], self._buf[new], width=t * dim * item, height=layers * heads,
                                dst_pitch=cap * dim * item, src_pitch=t * dim * item, dst_offset=start * dim * item)

    def _addresses(self) -> dict[str, int]:
        """Every LM tensor's address: the cache read in place, the window's K/V into their fixed buffers;
        ``key_end`` the pinned host value where it is a shape tensor."""
        host = {"key_end": int(self._staged["key_end"].ctypes.data)} if self.layout.key_end_on_host else {}
        slots = self._slots.addresses() if self._slots is not None else {}
        return {**{n: b.ptr for n, b in self._buf.items()}, **host, **slots,
                **{n: b.ptr for n, b in self._kv.items()}}

    def _set_shapes(self, context: Any, t: int, key_end: int) -> None:
        self._staged["key_end"][0] = key_end
        slots = self._slots.shapes(t) if self._slots is not None else ()
        for name, shape in (("inputs_embeds", (1, t, self.hidden)), ("position_ids", (3, 1, t)), *slots):
            if not context.set_input_shape(name, shape):
                raise BackendError(f"set_input_shape({name}, {shape}) refused: outside the engine's profile")


def trt_planner(bundle_path: str | Path, *, decoder: DecoderSettings | None = None, verify: bool = True,
                precision: str | None = None, variant: str | None = None, cuda_graphs: int = 4, device: int = 0,
                max_prompt_tokens: int | None = None, trusted_keys: Sequence[str | Path] = ()) -> Planner:
    """A :class:`Planner` on :class:`TrtBackend` over the bundle's engines for this GPU (:func:`select_engines`);
    config, tokenizer and schema from the bundle's ``model/`` (signed by one of ``trusted_keys`` when given). Raises
    :class:`PlannerSetupError` naming what is missing: the GPU, a matching engine, the TensorRT module."""
    settings = decoder or DecoderSettings()
    if settings.name == "rollouts":
        raise PlannerSetupError("the rollouts decoder on the TensorRT backend: rollouts need the torch backend")
    from .bundle_planner import open_bundle

    bundle = open_bundle(bundle_path, verify=verify, trusted_keys=trusted_keys)  # signed by them, when given
    try:
        memory = CudaMemory(device)
    except CudaUnavailableError as exc:
        raise PlannerSetupError(f"the tensorrt backend needs an NVIDIA GPU: {exc}") from exc
    try:
        engines = select_engines(bundle, memory.compute_capability, precision=precision, variant=variant)
        graphs = {a.role: a for a in bundle.graphs(variant="decomposed")}
        if "lm_step" not in graphs:
            raise PlannerSetupError(f"{bundle.path}: no decomposed lm_step graph (its spec and embeddings)")
        config, tokenizer, schema = driving_model_files(bundle.path / "model")
        vision = engines.get("vision")
        backend = TrtBackend(bundle.file(engines["lm_step"].path), bundle.file(graphs["lm_step"].path).parent,
                             vision_engine=None if vision is None else bundle_vision_engines(bundle, vision),
                             memory=memory,
                             own_memory=True, flavor=engine_flavor(engines["lm_step"]),
                             plugin=engines["lm_step"].variant == "plugin", cuda_graphs=cuda_graphs)
    except ImportError as exc:
        memory.close()
        raise PlannerSetupError(f"the bundle's engines need the {exc.name} module: {exc}") from exc
    except BaseException:
        memory.close()
        raise
    try:
        return Planner(backend, config, tokenizer, decoder=settings, schema=schema, prompt_limit=max_prompt_tokens)
    except BaseException:
        backend.close()
        raise
