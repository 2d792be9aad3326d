"""One external-data file per ONNX graph: ``<graph>.onnx.data`` beside ``<graph>.onnx``.

``torch.onnx.export`` writes a graph over protobuf's 2 GB limit with one file per initializer in the output
directory. :func:`consolidate` gathers a graph's weights (those files, or the inline initializers of a graph over
the threshold) into ``<graph>.onnx.data``, streaming tensor by tensor (never the whole model in memory), rewrites the
graph's references and removes the per-tensor files. Graph rewrites load the structure only
(``onnx.load(..., load_external_data=False)``) and keep the weights where they are (:func:`save_structure`).

The threshold is the graph's initializer bytes above which the weights go external; the environment variable
``BLOCKPILOT_EXTERNAL_DATA_BYTES`` lowers it (CI sets a few KB, so small models take the large-model path).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic_io import AtomicFile, atomic_open
from ..formats.onnx_external import ExternalDataError, external_files

THRESHOLD_ENV = "BLOCKPILOT_EXTERNAL_DATA_BYTES"
DEFAULT_THRESHOLD = 1 << 30  # well under protobuf's 2 GB, so later rewrites that add nodes stay under it too
MIN_TENSOR_BYTES = 1024  # smaller initializers (scales, shapes, indices) stay inline in the graph
ALIGN = 4096  # each tensor starts on a page boundary (memory-mappable)
COPY_CHUNK = 16 << 20


def external_threshold() -> int:
    """The initializer bytes above which a graph's weights are written as external data."""
    raw = os.environ.get(THRESHOLD_ENV)
    if raw is None or raw == "":
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError as exc:
        raise ExternalDataError(f"{THRESHOLD_ENV}={raw!r}: expected a byte count (an integer)") from exc
    if value < 0:
        raise ExternalDataError(f"{THRESHOLD_ENV}={raw!r}: must not be negative")
    return value


def data_file(graph: str | Path) -> str:
    """The external-data file name of ``graph``: ``<name>.onnx.data``."""
    return f"{Path(graph).name}.data"


def _tensors(graph: Any) -> Iterator[Any]:
    """Initializers and Constant-node tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _external_info(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return bool(tensor.data_location == TensorProto.EXTERNAL)


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def graph_weight_bytes(model: Any) -> int:
    """Bytes of a (structure-only or fully loaded) model's tensors: external lengths plus inline raw data."""
    total = 0
    for tensor in _tensors(model.graph):
        if _is_external(tensor):
            total += int(_external_info(tensor).get("length") or 0)
        else:
            total += len(tensor.raw_data)
    return total


def save_structure(model: Any, path: str | Path) -> None:
    """Save a model whose large tensors are external references (as loaded with ``load_external_data=False``),
    atomically; the references stay relative to ``path``'s directory, so it must be the graph's directory."""
    import onnx

    with atomic_open(path, "wb") as fh:
        onnx.save_model(model, fh)


def consolidate(graph: str | Path, *, threshold: int | None = None, model: Any = None) -> str | None:
    """Move ``graph``'s weights into ``<graph>.onnx.data`` when it already has external data or its tensors
    exceed ``threshold`` bytes (default :func:`external_threshold`); return the data file name, or ``None`` when
    the graph stays self-contained. ``model`` is the structure already loaded (``load_external_data=False``).
    Files the graph referenced before are deleted once the new file is in place."""
    import onnx

    path = Path(graph)
    root = path.parent
    if model is None:
        model = onnx.load(str(path), load_external_data=False)
    limit = external_threshold() if threshold is None else threshold
    n_inits = len(model.graph.initializer)
    tensors = list(_tensors(model.graph))  # the initializers first
    old_files = external_files(path)
    if not old_files and graph_weight_bytes(model) <= limit:
        return None
    name = data_file(path)
    offset = 0
    with atomic_open(root / name, "wb") as out:
        for index, tensor in enumerate(tensors):
            is_init = index < n_inits
            if _is_external(tensor):
                info = _external_info(tensor)
                src = root / info["location"]
                start = int(info.get("offset") or 0)
                length = int(info["length"]) if info.get("length") else src.stat().st_size - start
                pad = -offset % ALIGN
                out.write(b"\0" * pad)
                offset += pad
                with src.open("rb") as fin:
                    fin.seek(start)
                    _copy(fin, out, length, src)
            elif is_init and len(tensor.raw_data) >= MIN_TENSOR_BYTES:  # Constant nodes' tensors stay inline
                pad = -offset % ALIGN
                out.write(b"\0" * pad)
                offset += pad
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
            else:
                continue
            _set_external(tensor, name, offset, length)
            offset += length
    save_structure(model, path)
    for old in old_files:
        if old != name:
            (root / old).unlink(missing_ok=True)
    return name


def _copy(fin: Any, fout: Any, length: int, src: Path) -> None:
    left = length
    while left > 0:
        chunk = fin.read(min(COPY_CHUNK, left))
        if not chunk:
            raise ExternalDataError(f"{src}: external data ends {left} bytes short of the graph's reference")
        fout.write(chunk)
        left -= len(chunk)


def tensor_array(tensor: Any, base_dir: str | Path) -> Any:
    """One initializer's value as a numpy array, read from its external file when it has one (that tensor only)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = _external_info(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    src = Path(base_dir) / info["location"]
    with src.open("rb") as fh:
        fh.seek(int(info.get("offset") or 0))
        raw = fh.read(count * np.dtype(dtype).itemsize)
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ExternalDataError(f"{src}: tensor {tensor.name!r} needs {count * np.dtype(dtype).itemsize} bytes, "
                                f"the file holds {len(raw)} from its offset")
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))


class DataWriter:
    """Append tensors to a graph's new external-data file (page aligned), pointing each ``TensorProto`` at it."""

    def __init__(self, graph: str | Path) -> None:
        self.name = data_file(graph)
        self.path = Path(graph).parent / self.name
        self._out = AtomicFile(self.path, "wb")
        self._fh = self._out.file
        self.offset = 0

    def put(self, tensor: Any, raw: bytes | memoryview) -> None:
        pad = -self.offset % ALIGN
        self._fh.write(b"\0" * pad)
        self.offset += pad
        self._fh.write(raw)
        _set_external(tensor, self.name, self.offset, len(raw))
        self.offset += len(raw)

    def put_array(self, tensor: Any, array: Any, data_type: int | None = None) -> None:
        """Write ``array`` as ``tensor``'s data straight from the array (``data_type``: the tensor's new ONNX type;
        default unchanged). Never through the message: a copy put into a ``TensorProto`` stays in protobuf's arena
        until the whole model is freed, so a rewrite would end up holding every weight it converted."""
        import numpy as np

        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        if data_type is not None:
            tensor.data_type = data_type
        self.put(tensor, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self, keep: bool) -> None:
        """Finish the file (``keep``) or drop it (nothing was written)."""
        if keep:
            self._out.commit()
        else:
            self._out.discard()


def share_external_data(src_graph: str | Path, dst_graph: str | Path) -> None:
    """Make ``src_graph``'s external-data files reachable from ``dst_graph``'s directory (a rewrite saved elsewhere
    keeps the same relative references): nothing when the directories are the same, else a copy (onnx's checker
    refuses hard-linked data files)."""
    src, dst = Path(src_graph).parent.resolve(), Path(dst_graph).parent.resolve()
    if src == dst:
        return
    for loc in external_files(src_graph):
        target = dst / loc
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / loc, target)
