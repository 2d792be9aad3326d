"""Where an ONNX graph's initializer bytes lie, and a read-only memory map of them, with the standard library and
numpy only (no ``onnx`` package): the bytes of an inline tensor (``raw_data`` inside the ``.onnx`` file) or of an
external one (``location`` / ``offset`` / ``length`` in the data file beside the graph).

A bundle of a model with a tied embedding keeps the table once, as the LM head initializer of ``lm_step.onnx``; the
graph backends look token rows up through :func:`map_initializer` instead of a separate ``embed_tokens.npy``.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BlockpilotError
from .onnx_external import _GRAPH_INIT, _MODEL_GRAPH, ExternalDataError, _fields, _tensor, _varint

_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_RAW = 1, 2, 9
# TensorProto.DataType values the host side reads (float tables), by their numpy dtype.
FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


class TensorLocationError(BlockpilotError, ValueError):
    """An initializer is missing from a graph, stored in a form that cannot be mapped, or its bytes are short."""


@dataclass(frozen=True)
class TensorBytes:
    """One initializer: its name, shape, ONNX data type and the byte range holding it (``file`` is the graph itself
    for an inline tensor, the external data file otherwise)."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    file: Path
    offset: int
    length: int


def _dims_and_type(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int, ...], int, tuple[int, int] | None]:
    name, dims, dtype, raw = "", [], 0, None
    for field, wire, a, b in _fields(buf, start, end):
        if field == _TENSOR_DIMS and wire == 0:
            dims.append(a)
        elif field == _TENSOR_DIMS and wire == 2:  # packed
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos)
                dims.append(value)
        elif field == _TENSOR_DATA_TYPE and wire == 0:
            dtype = a
        elif field == 8 and wire == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == _TENSOR_RAW and wire == 2:
            raw = (a, b)
    return name, tuple(dims), dtype, raw


def initializers(graph: str | Path) -> list[TensorBytes]:
    """Every top-level initializer of the ONNX model at ``graph`` whose bytes can be mapped (``raw_data`` inline, or
    external data), in graph order; the weight bytes are skipped, never read."""
    path = Path(graph)
    found: list[TensorBytes] = []
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                for field, wire, a, b in _fields(buf, 0, len(buf)):
                    if field != _MODEL_GRAPH or wire != 2:
                        continue
                    for gf, gw, ta, tb in _fields(buf, a, b):
                        if gf != _GRAPH_INIT or gw != 2:
                            continue
                        name, dims, dtype, raw = _dims_and_type(buf, ta, tb)
                        ref = _tensor(buf, ta, tb)
                        if ref is not None:
                            size = ref.length if ref.length is not None else -1
                            found.append(TensorBytes(name, dims, dtype, path.parent / ref.location, ref.offset, size))
                        elif raw is not None:
                            found.append(TensorBytes(name, dims, dtype, path, raw[0], raw[1] - raw[0]))
            finally:
                buf.release()
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise TensorLocationError(f"{path}: unreadable ONNX model ({exc})") from exc
    except ExternalDataError as exc:
        raise TensorLocationError(f"{path}: {exc}") from exc
    return found


def find_initializer(graph: str | Path, name: str) -> TensorBytes:
    """The initializer ``name`` of ``graph``; raises :class:`TensorLocationError` naming both when it is absent."""
    for tensor in initializers(graph):
        if tensor.name == name:
            return tensor
    raise TensorLocationError(f"{graph}: no initializer {name!r} with mappable bytes (raw_data or external data)")


def map_initializer(tensor: TensorBytes) -> np.ndarray[Any, Any]:
    """A read-only memory map of ``tensor`` in its shape; bfloat16 maps as ``uint16`` (see :func:`to_float32`)."""
    if tensor.data_type not in FLOAT_TYPES:
        raise TensorLocationError(f"{tensor.file}: initializer {tensor.name!r} has ONNX data type {tensor.data_type}; "
                                  f"a float table must be one of {sorted(FLOAT_TYPES.values())}")
    dtype = np.dtype("uint16") if tensor.data_type == 16 else np.dtype(FLOAT_TYPES[tensor.data_type])
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    need = count * dtype.itemsize
    if tensor.length not in (-1, need):
        raise TensorLocationError(f"{tensor.file}: initializer {tensor.name!r} of shape {list(tensor.dims)} needs "
                                  f"{need} bytes but its record says {tensor.length}")
    try:
        size = tensor.file.stat().st_size
    except OSError as exc:
        raise TensorLocationError(f"{tensor.file}: initializer {tensor.name!r}: data file unreadable ({exc})") from exc
    if tensor.offset + need > size:
        raise TensorLocationError(f"{tensor.file}: initializer {tensor.name!r} needs bytes up to "
                                  f"{tensor.offset + need}, the file holds {size}")
    return np.memmap(tensor.file, dtype=dtype, mode="r", offset=tensor.offset, shape=tensor.dims)


def to_float32(values: np.ndarray[Any, Any], data_type: int) -> np.ndarray[Any, Any]:
    """``values`` (read from a tensor of ONNX ``data_type``) as a new float32 array."""
    if data_type == 16:  # bfloat16: the high half of a float32
        return (np.asarray(values, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.array(values, dtype=np.float32)
