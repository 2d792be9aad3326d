"""The CUDA drivers behind :class:`~blockpilot.runtime.cuda_memory.CudaMemory`, one small interface each:
cuda.core (cuda-python's object layer), cuda-python's runtime bindings, and pycuda where that is what a
Jetson image has (no graph capture through it). Every driver raises :class:`CudaUnavailableError` saying
why when there is no usable GPU (no driver, no device, bindings not installed) and :class:`CudaError`
naming the call when a call fails. Nothing here imports torch or TensorRT.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from .backend import BackendError

APIS = ("cuda-python", "cuda-core", "pycuda")
AUTO_ORDER = ("cuda-python", "pycuda")  # cuda-core by name only until the GPU tests have run it


class CudaUnavailableError(BackendError):
    """No usable CUDA here: no NVIDIA driver, no CUDA device, or neither cuda-python nor pycuda importable."""


class CudaError(BackendError):
    """A CUDA call failed on a machine that has a GPU; the message names the call and CUDA's error."""


def runtime_call(rt: Any, result: Any, what: str) -> Any:
    """The value(s) of a cuda-python runtime call's ``(error, *values)`` result; :class:`CudaError` naming
    ``what`` and CUDA's error when it failed."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise CudaError(f"{what} failed: {name} ({text})", name)
    return values[0] if len(values) == 1 else tuple(values)


def pinned_array(ptr: int, nbytes: int) -> npt.NDArray[np.uint8]:
    """A numpy view of ``nbytes`` of page-locked host memory at ``ptr`` (the driver keeps it alive)."""
    return np.frombuffer(memoryview((ctypes.c_uint8 * nbytes).from_address(ptr)), dtype=np.uint8)


class _CudaPython:
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""

    name = "cuda-python"
    graphs = True

    def __init__(self, device: int) -> None:
        try:
            rt: Any = importlib.import_module("cuda.bindings.runtime")
        except ImportError:
            rt = importlib.import_module("cuda.cudart")  # ImportError here means: not installed
        self.rt = rt
        try:
            version = importlib.metadata.version("cuda-python")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        try:
            count = self._call(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except CudaError as exc:
            hint = {"cudaErrorInsufficientDriver": "no NVIDIA driver is loaded on this machine, or it is older than "
                                                   "the CUDA runtime of cuda-python " + version,
                    "cudaErrorNoDevice": "the NVIDIA driver sees no CUDA device"}.get(str(exc.args[1]), "")
            raise CudaUnavailableError(f"no usable CUDA GPU: {exc.args[0]}" + (f" ({hint})" if hint else "")) from None
        except Exception as exc:  # a missing libcuda surfaces as a loader error from cuda.pathfinder
            raise CudaUnavailableError(f"no usable CUDA GPU: cuda-python {version} cannot reach the NVIDIA driver "
                                       f"({type(exc).__name__}: {exc})") from None
        if not 0 <= device < int(count):
            raise CudaUnavailableError(f"no CUDA device {device}: the driver sees {count} device(s)")
        self._call(rt.cudaSetDevice(device), "cudaSetDevice")
        attr = rt.cudaDeviceAttr
        major = self._call(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "attribute")
        minor = self._call(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "attribute")
        self.compute_capability = f"{int(major)}.{int(minor)}"
        self.stream_obj = self._call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self.stream = int(self.stream_obj)

    def _call(self, result: Any, what: str) -> Any:
        return runtime_call(self.rt, result, what)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def pinned(self, nbytes: int) -> tuple[npt.NDArray[np.uint8], Any]:
        ptr = int(self._call(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        return pinned_array(ptr, nbytes), ptr

    def free_pinned(self, handle: Any) -> None:
        self._call(self.rt.cudaFreeHost(handle), "cudaFreeHost")

    def htod(self, dst: int, host: npt.NDArray[Any]) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, self.stream_obj), "H2D copy")

    def dtoh(self, host: npt.NDArray[Any], src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, self.stream_obj), "D2H copy")

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream_obj), "D2D copy")

    def dtod_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, self.stream_obj),
                   "strided D2D copy")

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        self._call(self.rt.cudaMemsetAsync(dst, value, nbytes, self.stream_obj), "cudaMemsetAsync")

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream_obj), "cudaStreamSynchronize")

    def capture(self, work: Callable[[], None]) -> Any:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(self.rt.cudaStreamBeginCapture(self.stream_obj, mode), "cudaStreamBeginCapture")
        try:
            work()
        finally:  # always leave capture mode, or the stream stays unusable
            graph = self._call(self.rt.cudaStreamEndCapture(self.stream_obj), "cudaStreamEndCapture")
        try:
            return self._call(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self._call(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def launch(self, graph: Any) -> None:
        self._call(self.rt.cudaGraphLaunch(graph, self.stream_obj), "cudaGraphLaunch")

    def drop_graph(self, graph: Any) -> None:
        self._call(self.rt.cudaGraphExecDestroy(graph), "cudaGraphExecDestroy")

    def close(self) -> None:
        self._call(self.rt.cudaStreamDestroy(self.stream_obj), "cudaStreamDestroy")


class _PyCuda:
    """pycuda's driver API with a retained primary context (the one TensorRT uses too); no graph capture."""

    name = "pycuda"
    graphs = False

    def __init__(self, device: int) -> None:
        drv: Any = importlib.import_module("pycuda.driver")
        self.drv = drv
        try:
            drv.init()
            if not 0 <= device < drv.Device.count():
                raise CudaUnavailableError(f"no CUDA device {device}: the driver sees {drv.Device.count()} device(s)")
            dev = drv.Device(device)
            self.context = dev.retain_primary_context()
            self.context.push()
        except drv.Error as exc:
            raise CudaUnavailableError(f"no usable CUDA GPU: pycuda: {exc}") from None
        major, minor = dev.compute_capability()
        self.compute_capability = f"{major}.{minor}"
        self.stream_obj = drv.Stream()
        self.stream = int(self.stream_obj.handle)
        self._allocations: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        allocation = self.drv.mem_alloc(nbytes)
        self._allocations[int(allocation)] = allocation  # pycuda frees on garbage collection: keep it alive
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def pinned(self, nbytes: int) -> tuple[npt.NDArray[np.uint8], Any]:
        array = self.drv.pagelocked_empty(nbytes, np.uint8)
        return array, array

    def free_pinned(self, handle: Any) -> None:
        handle.base.free()

    def htod(self, dst: int, host: npt.NDArray[Any]) -> None:
        self.drv.memcpy_htod_async(dst, host, self.stream_obj)

    def dtoh(self, host: npt.NDArray[Any], src: int) -> None:
        self.drv.memcpy_dtoh_async(host, src, self.stream_obj)

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        self.drv.memcpy_dtod_async(dst, src, nbytes, self.stream_obj)

    def dtod_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        copy = self.drv.Memcpy2D()
        copy.set_src_device(src)
        copy.set_dst_device(dst)
        copy.src_pitch, copy.dst_pitch, copy.width_in_bytes, copy.height = spitch, dpitch, width, height
        copy(self.stream_obj)

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        self.drv.memset_d8_async(dst, value, nbytes, self.stream_obj)

    def synchronize(self) -> None:
        self.stream_obj.synchronize()

    def capture(self, work: Callable[[], None]) -> Any:
        raise CudaError("CUDA-graph capture is not offered through pycuda here; install cuda-python for it", "")

    def launch(self, graph: Any) -> None:
        raise CudaError("no CUDA graphs through pycuda", "")

    def drop_graph(self, graph: Any) -> None:
        return None

    def close(self) -> None:
        self.stream_obj = None
        self.context.pop()


class _CudaCore:
    """cuda.core, cuda-python's object layer: the device, a non-blocking stream, stream-ordered device
    buffers, pinned host buffers, copies, memsets and graph building by stream capture, with its own error
    checking. It has no strided (pitched) copy, so :meth:`dtod_2d` is the one runtime-binding call."""

    name = "cuda-core"
    graphs = True

    def __init__(self, device: int) -> None:
        core: Any = importlib.import_module("cuda.core")  # ImportError here means: not installed
        self.core = core
        self.rt: Any = importlib.import_module("cuda.bindings.runtime")
        self.error: type[Exception] = importlib.import_module("cuda.core._utils.cuda_utils").CUDAError
        try:
            count = len(core.Device.get_all_devices())
        except Exception as exc:  # no libcuda: a loader error from cuda.pathfinder; an old driver: CUDAError
            raise CudaUnavailableError(f"no usable CUDA GPU: cuda.core cannot reach the NVIDIA driver "
                                       f"({type(exc).__name__}: {exc})") from None
        if not 0 <= device < count:
            raise CudaUnavailableError(f"no CUDA device {device}: the driver sees {count} device(s)")
        with self._errors("opening the device"):
            self.device = core.Device(device)
            self.device.set_current()  # the primary context, the one TensorRT uses too
            cc = self.device.compute_capability
            self.compute_capability = f"{cc.major}.{cc.minor}"
            self.stream_obj = self.device.create_stream(options=core.StreamOptions(nonblocking=True))
            self.pinned_memory = core.LegacyPinnedMemoryResource()  # cuMemAllocHost
        self.stream = int(self.stream_obj.handle)
        self._buffers: dict[int, Any] = {}

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self.error as exc:
            raise CudaError(f"{what} failed: {exc}", str(exc).split(":", 1)[0]) from None

    def _view(self, ptr: int, nbytes: int) -> Any:
        """A cuda.core buffer over memory owned elsewhere (never freed through it)."""
        return self.core.Buffer.from_handle(ptr, nbytes)

    def malloc(self, nbytes: int) -> int:
        with self._errors(f"allocating {nbytes} device bytes"):
            buffer = self.device.allocate(nbytes, stream=self.stream_obj)
        ptr = int(buffer.handle)
        if ptr % 256:  # TensorRT's I/O needs cudaMalloc's alignment
            buffer.close(self.stream_obj)
            raise CudaError(f"cuda.core handed out device memory at {ptr:#x}, not 256-byte aligned", "")
        self._buffers[ptr] = buffer
        return ptr

    def free(self, ptr: int) -> None:
        with self._errors("freeing device memory"):
            self._buffers.pop(ptr).close(self.stream_obj)

    def pinned(self, nbytes: int) -> tuple[npt.NDArray[np.uint8], Any]:
        with self._errors(f"allocating {nbytes} pinned host bytes"):
            buffer = self.pinned_memory.allocate(nbytes)
        return pinned_array(int(buffer.handle), nbytes), buffer

    def free_pinned(self, handle: Any) -> None:
        with self._errors("freeing pinned host memory"):
            handle.close()

    def _copy(self, dst: int, src: int, nbytes: int, what: str) -> None:
        with self._errors(what):
            self._view(dst, nbytes).copy_from(self._view(src, nbytes), stream=self.stream_obj)

    def htod(self, dst: int, host: npt.NDArray[Any]) -> None:
        self._copy(dst, host.ctypes.data, host.nbytes, "H2D copy")

    def dtoh(self, host: npt.NDArray[Any], src: int) -> None:
        self._copy(host.ctypes.data, src, host.nbytes, "D2H copy")

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        self._copy(dst, src, nbytes, "D2D copy")

    def dtod_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        runtime_call(self.rt, self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, self.stream),
                     "strided D2D copy")

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        with self._errors("memset"):
            self._view(dst, nbytes).fill(value, stream=self.stream_obj)

    def synchronize(self) -> None:
        with self._errors("stream synchronize"):
            self.stream_obj.sync()

    def capture(self, work: Callable[[], None]) -> Any:
        with self._errors("begin graph capture"):
            builder = self.stream_obj.create_graph_builder().begin_building("thread_local")
        try:
            work()
        finally:  # always leave capture mode, or the stream stays unusable
            with self._errors("end graph capture"):
                builder.end_building()
        try:
            with self._errors("graph instantiate"):
                return builder.complete()
        finally:
            builder.close()

    def launch(self, graph: Any) -> None:
        with self._errors("graph launch"):
            graph.launch(self.stream_obj)

    def drop_graph(self, graph: Any) -> None:
        graph.close()

    def close(self) -> None:
        with self._errors("stream destroy"):
            self.stream_obj.close()


Driver = _CudaPython | _CudaCore | _PyCuda
_DRIVERS: dict[str, type[Driver]] = {"cuda-python": _CudaPython, "cuda-core": _CudaCore, "pycuda": _PyCuda}


def open_driver(api: str, device: int) -> Driver:
    """The driver named ``api`` on ``device``, or with ``auto`` the first of :data:`AUTO_ORDER` installed here."""
    if api not in ("auto", *APIS):
        raise ValueError(f"CUDA api {api!r}: choose auto or one of {', '.join(APIS)}")
    missing: list[str] = []
    for name in AUTO_ORDER if api == "auto" else (api,):
        try:
            return _DRIVERS[name](device)
        except ImportError as exc:
            missing.append(f"{name} is not installed ({exc})")
    raise CudaUnavailableError("no CUDA Python bindings: " + "; ".join(missing)
                               + " (pip install 'blockpilot[trt-runtime]')")
