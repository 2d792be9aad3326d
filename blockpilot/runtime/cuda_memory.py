"""The one device-memory layer of the TensorRT backend: device buffers, pinned host staging, one CUDA stream,
asynchronous copies and memsets, and CUDA-graph capture of work enqueued on that stream.

:class:`CudaMemory` owns every allocation it hands out; :meth:`CudaMemory.close` (or leaving its ``with``
block) frees them all, graphs and the stream included, so no device buffer is without an owner. The drivers
behind it (:mod:`blockpilot.runtime.cuda_drivers`): cuda-python's runtime bindings (x86 workstations,
JetPack 6+ images with ``cuda-python``), cuda.core (the same package's object layer, chosen by name until
it has been run on a GPU here) and pycuda where that is what a Jetson image has (no graph capture through
it). On a machine without a usable GPU, construction raises :class:`CudaUnavailableError` saying why: no
driver, no device, or no CUDA Python bindings at all. Nothing here imports torch or TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from .cuda_drivers import APIS, CudaError, CudaUnavailableError, open_driver

__all__ = ["APIS", "CudaError", "CudaMemory", "CudaUnavailableError", "DeviceBuffer", "compute_capability"]


@dataclass(frozen=True)
class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``, owned by the :class:`CudaMemory` that made it."""

    name: str
    ptr: int
    nbytes: int


class CudaMemory:
    """Device buffers, pinned host buffers, one non-blocking stream and its captured graphs, all owned here.

    Every copy and memset is asynchronous on :attr:`stream`; :meth:`synchronize` waits for them. ``api``:
    ``auto`` (cuda-python, else pycuda), ``cuda-python``, ``cuda-core`` or ``pycuda``.
    """

    def __init__(self, device: int = 0, *, api: str = "auto") -> None:
        self._api = open_driver(api, device)
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
