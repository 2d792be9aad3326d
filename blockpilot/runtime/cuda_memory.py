"""The one device-memory layer of the TensorRT backend: device buffers, pinned host staging, one CUDA stream,
asynchronous copies and memsets, and CUDA-graph capture of work enqueued on that stream.

:class:`CudaMemory` owns every allocation it hands out; :meth:`CudaMemory.close` (or leaving its ``with``
block) frees them all, graphs and the stream included, so no device buffer is without an owner. Two drivers
sit behind one small interface: cuda-python's runtime bindings (x86 workstations, JetPack 6+ images with
``cuda-python``) and pycuda where that is what a Jetson image has (no graph capture through it). On a
machine without a usable GPU, construction raises :class:`CudaUnavailableError` saying why: no driver, no
device, or no CUDA Python bindings at all. Nothing here imports torch or TensorRT.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from .backend import BackendError

APIS = ("cuda-python", "pycuda")


class CudaUnavailableError(BackendError):
    """No usable CUDA here: no NVIDIA driver, no CUDA device, or neither cuda-python nor pycuda importable."""


class CudaError(BackendError):
    """A CUDA call failed on a machine that has a GPU; the message names the call and CUDA's error."""


@dataclass(frozen=True)
class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``, owned by the :class:`CudaMemory` that made it."""

    name: str
    ptr: int
    nbytes: int


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
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            text = self.rt.cudaGetErrorString(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CudaError(f"{what} failed: {name} ({text})", name)
        return values[0] if len(values) == 1 else tuple(values)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def pinned(self, nbytes: int) -> tuple[npt.NDArray[np.uint8], Any]:
        ptr = int(self._call(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        array = np.frombuffer(memoryview((ctypes.c_uint8 * nbytes).from_address(ptr)), dtype=np.uint8)
        return array, ptr

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


def _open(api: str, device: int) -> _CudaPython | _PyCuda:
    if api not in ("auto", *APIS):
        raise ValueError(f"CUDA api {api!r}: choose auto or one of {', '.join(APIS)}")
    missing: list[str] = []
    for name, cls in (("cuda-python", _CudaPython), ("pycuda", _PyCuda)):
        if api not in ("auto", name):
            continue
        try:
            return cls(device)
        except ImportError as exc:
            missing.append(f"{name} is not installed ({exc})")
    raise CudaUnavailableError("no CUDA Python bindings: " + "; ".join(missing)
                               + " (install cuda-python, the blockpilot[trt] extra)")


class CudaMemory:
    """Device buffers, pinned host buffers, one non-blocking stream and its captured graphs, all owned here.

    Every copy and memset is asynchronous on :attr:`stream`; :meth:`synchronize` waits for them. ``api``:
    ``auto`` (cuda-python, else pycuda), ``cuda-python`` or ``pycuda``.
    """

    def __init__(self, device: int = 0, *, api: str = "auto") -> None:
        self._api = _open(api, device)
        self.device = device
        self._buffers: dict[int, DeviceBuffer] = {}
        self._pinned: list[Any] = []
        self._graphs: list[Any] = []
        self._closed = False

    @property
    def api(self) -> str:
        return self._api.name

    @property
    def compute_capability(self) -> str:
        """``"major.minor"`` of the device, e.g. ``"8.9"``."""
        return self._api.compute_capability

    @property
    def stream(self) -> int:
        """The stream handle, as ``IExecutionContext.execute_async_v3`` takes it."""
        return self._api.stream

    @property
    def supports_graphs(self) -> bool:
        return self._api.graphs

    @property
    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def alloc(self, name: str, nbytes: int) -> DeviceBuffer:
        """``nbytes`` (at least 1) of device memory, freed by :meth:`close`; 256-byte aligned (cudaMalloc)."""
        self._check_open()
        buffer = DeviceBuffer(name, self._api.malloc(max(int(nbytes), 1)), int(nbytes))
        self._buffers[buffer.ptr] = buffer
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        """Free one buffer early (the stream is synchronized first: work queued on it may still read it)."""
        if self._buffers.pop(buffer.ptr, None) is not None:
            self._api.synchronize()
            self._api.free(buffer.ptr)

    def pinned(self, shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        """A page-locked host array (fast asynchronous copies), zero-filled, freed by :meth:`close`."""
        self._check_open()
        dt = np.dtype(dtype)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = max(int(np.prod(dims, dtype=np.int64)) * dt.itemsize, 1)
        raw, handle = self._api.pinned(nbytes)
        self._pinned.append(handle)
        array = raw[: int(np.prod(dims, dtype=np.int64)) * dt.itemsize].view(dt).reshape(dims)
        array.fill(0)
        return array

    def upload(self, dst: DeviceBuffer, host: npt.NDArray[Any]) -> None:
        """Queue a copy of the contiguous ``host`` array to the start of ``dst``."""
        self._check_fit(dst, host)
        self._api.htod(dst.ptr, host)

    def download(self, host: npt.NDArray[Any], src: DeviceBuffer) -> None:
        """Queue a copy of the first ``host.nbytes`` of ``src`` into the contiguous ``host`` array."""
        self._check_fit(src, host)
        self._api.dtoh(host, src.ptr)

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer, nbytes: int | None = None) -> None:
        n = min(dst.nbytes, src.nbytes) if nbytes is None else nbytes
        if n > min(dst.nbytes, src.nbytes):
            raise ValueError(f"device copy of {n} bytes between {src.name} and {dst.name} overruns a buffer")
        self._api.dtod(dst.ptr, src.ptr, n)

    def copy_2d(self, dst: DeviceBuffer, src: DeviceBuffer, *, width: int, height: int, dst_pitch: int,
                src_pitch: int, dst_offset: int = 0) -> None:
        """Queue a strided device copy: ``height`` rows of ``width`` bytes, ``src_pitch`` bytes apart from the
        start of ``src`` and ``dst_pitch`` apart from ``dst_offset`` in ``dst`` (a window's rows into a cache)."""
        span = (height - 1) * max(dst_pitch, 0) + width + dst_offset
        if width > min(dst_pitch, src_pitch) or span > dst.nbytes or (height - 1) * src_pitch + width > src.nbytes:
            raise ValueError(f"strided copy of {height} x {width} bytes from {src.name} (pitch {src_pitch}) into "
                             f"{dst.name} (pitch {dst_pitch}, offset {dst_offset}) overruns a buffer")
        self._api.dtod_2d(dst.ptr + dst_offset, dst_pitch, src.ptr, src_pitch, width, height)

    def memset(self, dst: DeviceBuffer, value: int = 0, nbytes: int | None = None) -> None:
        self._api.memset(dst.ptr, value, dst.nbytes if nbytes is None else min(nbytes, dst.nbytes))

    def synchronize(self) -> None:
        self._api.synchronize()

    def capture(self, work: Callable[[], None]) -> Any:
        """Record what ``work`` enqueues on :attr:`stream` into an executable CUDA graph (nothing runs);
        the graph is owned here until :meth:`drop_graph` or :meth:`close`."""
        self._check_open()
        graph = self._api.capture(work)
        self._graphs.append(graph)
        return graph

    def launch(self, graph: Any) -> None:
        self._api.launch(graph)

    def drop_graph(self, graph: Any) -> None:
        if graph in self._graphs:
            self._graphs.remove(graph)
            self._api.drop_graph(graph)

    def close(self) -> None:
        """Wait for the stream, then free every graph, buffer, pinned array and the stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._api.synchronize()
        finally:
            for graph in self._graphs:
                self._api.drop_graph(graph)
            for buffer in self._buffers.values():
                self._api.free(buffer.ptr)
            for handle in self._pinned:
                self._api.free_pinned(handle)
            self._graphs, self._buffers, self._pinned = [], {}, []
            self._api.close()

    def __enter__(self) -> CudaMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CudaError("this CudaMemory is closed", "")

    def _check_fit(self, buffer: DeviceBuffer, host: npt.NDArray[Any]) -> None:
        if not host.flags.c_contiguous:
            raise ValueError(f"copy with {buffer.name}: the host array must be C-contiguous")
        if host.nbytes > buffer.nbytes:
            raise ValueError(f"copy of {host.nbytes} bytes overruns {buffer.name} ({buffer.nbytes} bytes)")


def compute_capability(device: int = 0, *, api: str = "auto") -> str:
    """``"major.minor"`` of CUDA ``device``; raises :class:`CudaUnavailableError` on a machine without one."""
    with CudaMemory(device, api=api) as memory:
        return memory.compute_capability
