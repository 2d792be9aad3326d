"""Engine-level plumbing of the TensorRT backend: one deserialized engine with its tensor dtypes and shapes,
where the LM step's inputs live (:func:`lm_layout`), execution contexts that share one scratch allocation, and
the CUDA graphs of LM steps.

Works with ``tensorrt`` (TensorRT 10.x / 11.x, JetPack) and ``tensorrt_rtx`` alike: only the name-based I/O
API of TensorRT 10 (``get_tensor_name``, ``set_tensor_address``, ``set_input_shape``, ``execute_async_v3``).
Engines of the plugin graph need the ``BlockDiffusionAttention`` plugin registered before they are
deserialized (``TrtEngine.load(..., plugin=True)``; :mod:`blockpilot.trt.plugin`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..trt.compat import load_tensorrt
from .backend import BackendError
from .cuda_memory import CudaMemory, DeviceBuffer
from .plan_types import PlannerSetupError

_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
          "INT8": np.int8, "UINT8": np.uint8}
LM_INPUTS = ("inputs_embeds", "position_ids", "start", "key_end", "mode", "past_k", "past_v")
LM_OUTPUTS = ("top1", "prob", "k_new", "v_new")  # the window I/O (runtime.kv_window)
StepKey = tuple[int, int, int]  # (T, key_end or -1 where key_end lives on the device, 0: one cache)


def dtype_name(dtype: Any) -> str:
    """``"INT64"`` from ``DataType.INT64`` (an engine's or a network tensor's data type)."""
    return str(dtype).rsplit(".", 1)[-1]


def numpy_dtype(kind: str, where: Path | str, name: str) -> Any:
    if kind not in _NUMPY:
        raise PlannerSetupError(f"{where}: tensor {name} is {kind}; the backend moves {', '.join(_NUMPY)}")
    return _NUMPY[kind]


@dataclass(frozen=True)
class LmLayout:
    """Where the LM step's tensors live and their numpy dtypes. ``key_end_on_host``: a shape tensor (it feeds the
    ``Range`` of visible keys in decomposed and native engines; its address is host memory, read when work is
    enqueued); otherwise an ordinary device input (plugin engines: it only reaches the plugins, as int32 data)."""

    dtypes: dict[str, Any]
    key_end_on_host: bool


def lm_layout(inputs: Sequence[str], outputs: Sequence[str], is_host: Callable[[str], bool],
              kind: Callable[[str], str], where: Path | str) -> LmLayout:
    """:class:`LmLayout` of an LM-step engine from its I/O names, whether each input is read on the host
    (``ICudaEngine.is_shape_inference_io``; a parsed network's ``ITensor.is_shape_tensor``) and each tensor's
    data type name. Raises :class:`PlannerSetupError` for an engine of another graph, or one with any host input
    other than ``key_end``."""
    missing = [n for n in LM_INPUTS if n not in inputs] + [n for n in LM_OUTPUTS if n not in outputs]
    if missing and all(n in outputs for n in ("present_k", "present_v")):
        from .kv_window import REEXPORT, StaleExportError

        raise StaleExportError(f"{where}: an lm_step engine of the whole-cache KV I/O (present_k / present_v "
                               f"outputs, built before the window I/O); {REEXPORT}")
    if missing:
        raise PlannerSetupError(f"{where}: not an lm_step engine of this export (no {', '.join(missing)})")
    host = [n for n in inputs if is_host(n)]
    if host not in ([], ["key_end"]):
        raise PlannerSetupError(f"{where}: host (shape tensor) inputs {host}; the backend reads only key_end on "
                                "the host (decomposed and native engines) or none (plugin engines)")
    return LmLayout({n: numpy_dtype(kind(n), where, n) for n in (*LM_INPUTS, *LM_OUTPUTS)}, host == ["key_end"])


class TrtEngine:
    """One engine of ``module`` (``tensorrt`` or ``tensorrt_rtx``) deserialized from ``path``."""

    def __init__(self, module: Any, runtime: Any, path: Path, compute_capability: str) -> None:
        self.trt, self.path = module, path
        self._runtime = runtime  # the runtime must outlive its engines
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise PlannerSetupError(f"{path}: {module.__name__} {module.__version__} could not deserialize this engine "
                                    f"on this GPU (sm {compute_capability}); see the TensorRT log above (wrong GPU, "
                                    "TensorRT version, or a plugin library not loaded)")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == module.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._scratch: DeviceBuffer | None = None

    @staticmethod
    def load(flavor: str, paths: list[Path], compute_capability: str, *, plugin: bool = False) -> list[TrtEngine]:
        """Import ``flavor`` (``tensorrt`` or ``tensorrt_rtx``; :class:`blockpilot.trt.TrtUnavailableError`, an
        ``ImportError``, where it is missing) and deserialize each of ``paths`` with one runtime. ``plugin``:
        the engines hold ``BlockDiffusionAttention`` layers, so the plugin is registered first (once per module)."""
        module = load_tensorrt(prefer=(flavor,)).module
        if plugin:
            from ..trt.plugin import check_run_requirements, register_plugin

            check_run_requirements()
            register_plugin(module)
        runtime = module.Runtime(module.Logger(module.Logger.WARNING))
        return [TrtEngine(module, runtime, p, compute_capability) for p in paths]

    @property
    def scratch_bytes(self) -> int:
        """Device memory one context needs at the profile's largest shapes."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def use_scratch(self, buffer: DeviceBuffer) -> None:
        """Contexts made after this run in ``buffer`` (shared: contexts on one stream never overlap)."""
        if buffer.nbytes < self.scratch_bytes:
            raise ValueError(f"{self.path}: scratch of {buffer.nbytes} bytes, the engine needs {self.scratch_bytes}")
        self._scratch = buffer

    def context(self) -> Any:
        """A new execution context over the shared scratch (TensorRT's own allocation where it has no strategy)."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        if strategy is None or self._scratch is None:
            return self.engine.create_execution_context()
        context = self.engine.create_execution_context(strategy.USER_MANAGED)
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
        else:  # TensorRT 10.0
            context.device_memory = self._scratch.ptr
        return context

    def is_host(self, name: str) -> bool:
        """Whether ``name`` lives in host memory: a shape tensor (read by shape inference on the host)."""
        return bool(self.engine.is_shape_inference_io(name))

    def aliased_input(self, name: str) -> str | None:
        """The input an output shares memory with (an in-place plugin write), or ``None``."""
        query = getattr(self.engine, "get_aliased_input_tensor", None)
        return (query(name) or None) if query is not None else None

    def dtype(self, name: str) -> Any:
        return numpy_dtype(self.kind(name), self.path, name)

    def kind(self, name: str) -> str:
        """The TensorRT data type name of tensor ``name`` (``"FLOAT"``, ``"INT64"``, ...)."""
        return dtype_name(self.engine.get_tensor_dtype(name))

    def lm_layout(self) -> LmLayout:
        return lm_layout(self.inputs, self.outputs, self.is_host, self.kind, self.path)

    def max_shape(self, name: str) -> tuple[int, ...]:
        """An input's shape, its dynamic dimensions at the maximum of optimization profile 0."""
        shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            shape = tuple(int(d) for d in self.engine.get_tensor_profile_shape(name, 0)[2])
        return shape

    def nbytes(self, name: str, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(self.dtype(name)).itemsize


def bind(context: Any, addresses: dict[str, int], where: Path) -> None:
    """Set every tensor address of ``context`` (once; a refusal names the tensor)."""
    for name, ptr in addresses.items():
        if not context.set_tensor_address(name, ptr):
            raise BackendError(f"{where}: set_tensor_address({name}) refused")


def enqueue(context: Any, stream: int, what: str) -> None:
    if not context.execute_async_v3(stream):
        raise BackendError(f"TensorRT execute_async_v3 failed ({what}); see the TensorRT log")


class TrtStepGraphs:
    """CUDA graphs of LM steps keyed by ``(T, key_end, 0)``, each with its own execution context; at most
    ``limit`` kept, least recently used dropped. :attr:`note` says why graphs are off (``""`` while on)."""

    def __init__(self, memory: CudaMemory, limit: int) -> None:
        self.memory, self.limit = memory, limit
        self.note = "" if limit > 0 else "off (cuda_graphs=0)"
        if limit > 0 and not memory.supports_graphs:
            self.note = f"off: no graph capture through {memory.api}"
        self.graphs: OrderedDict[StepKey, tuple[Any, Any]] = OrderedDict()
        self._seen: OrderedDict[StepKey, None] = OrderedDict()
        self.replays = self.captures = 0

    @property
    def enabled(self) -> bool:
        return not self.note

    def replay(self, key: StepKey) -> bool:
        """Launch the graph of ``key`` if there is one."""
        entry = self.graphs.get(key)
        if entry is None:
            return False
        self.graphs.move_to_end(key)
        self.memory.launch(entry[1])
        self.replays += 1
        return True

    def wanted(self, key: StepKey) -> bool:
        """Whether to capture ``key`` now. A block step (T > 1) repeats its key (the denoising drafts and the
        commit of one block share it), so it is captured at first sight; a one-token step only at its second
        (an AR decoder's steps never repeat a key, so they never pay for a capture)."""
        if not self.enabled:
            return False
        if key[0] > 1 or key in self._seen:
            return True
        self._seen[key] = None
        while len(self._seen) > 16 * self.limit:
            self._seen.popitem(last=False)
        return False

    def capture(self, key: StepKey, context: Any) -> None:
        """Capture ``context``'s enqueue (it ran once eagerly with these shapes just before); on failure graphs
        turn off and every later step runs eagerly."""
        capturable = getattr(context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.memory.stream):
            self.note = "off: TensorRT reports the context not stream-capturable (engine built without user allocation)"
            return
        try:
            graph = self.memory.capture(lambda: enqueue(context, self.memory.stream, f"capture of step {key}"))
        except BackendError as exc:
            self.note = f"off: capture failed ({exc})"
            return
        self.graphs[key] = (context, graph)
        self._seen.pop(key, None)
        self.captures += 1
        while len(self.graphs) > self.limit:
            _, (_, old) = self.graphs.popitem(last=False)
            self.memory.drop_graph(old)

    def clear(self) -> None:
        for _, graph in self.graphs.values():
            self.memory.drop_graph(graph)
        self.graphs.clear()
        self._seen.clear()
