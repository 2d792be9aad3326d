"""The external-data files an ONNX graph references, read with the standard library only (no ``onnx`` package), so
the bundle writer, ``blockpilot inspect`` and the car's loader all refuse a graph whose weights are not beside it.

A graph over protobuf's 2 GB limit keeps its initializers in external files: each such ``TensorProto`` carries
``data_location = EXTERNAL`` and ``external_data`` entries ``location`` (a path relative to the graph's directory),
``offset`` and ``length``. :func:`external_refs` walks the serialized model (memory-mapped, the raw weight bytes
are skipped, never copied) through the graph, its nodes' tensor attributes and subgraphs.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import BlockpilotError


class ExternalDataError(BlockpilotError, ValueError):
    """A graph references external data that is missing, outside its directory or too short; names both files."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data: ``location`` relative to the graph's directory, ``offset`` and ``length``
    (``None``: to the end of the file)."""

    tensor: str
    location: str
    offset: int
    length: int | None


# Field numbers of onnx.proto3 that can hold a TensorProto: ModelProto.graph; GraphProto.node / initializer /
# sparse_initializer; NodeProto.attribute; AttributeProto.t / g / tensors / graphs / sparse_tensor(s);
# SparseTensorProto.values / indices.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ExternalDataError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire type, value or start, end)`` of each field in ``buf[start:end]``; length-delimited fields
    give their byte range, varints their value (and ``end`` = -1)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value, -1
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ExternalDataError(f"field {field} runs past its message")
            yield field, wire, pos, pos + size
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ExternalDataError(f"unsupported protobuf wire type {wire}")


def _tensor(buf: memoryview, start: int, end: int) -> ExternalRef | None:
    name, location, entries = "", 0, {}
    for field, wire, a, b in _fields(buf, start, end):
        if field == _TENSOR_NAME and wire == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == _TENSOR_LOCATION and wire == 0:
            location = a
        elif field == _TENSOR_EXTERNAL and wire == 2:
            kv = {f: bytes(buf[s:e]).decode("utf-8", "replace") for f, w, s, e in _fields(buf, a, b) if w == 2}
            entries[kv.get(1, "")] = kv.get(2, "")
    if location != EXTERNAL:
        return None
    if "location" not in entries:
        raise ExternalDataError(f"tensor {name!r} is EXTERNAL but names no location")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError as exc:
        raise ExternalDataError(f"tensor {name!r}: bad external offset/length ({exc})") from exc
    return ExternalRef(name, entries["location"], offset, length)


def _sparse(buf: memoryview, start: int, end: int) -> Iterator[ExternalRef]:
    for field, wire, a, b in _fields(buf, start, end):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == 2 and (ref := _tensor(buf, a, b)):
            yield ref


def _graph(buf: memoryview, start: int, end: int) -> Iterator[ExternalRef]:
    for field, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if field == _GRAPH_INIT and (ref := _tensor(buf, a, b)):
            yield ref
        elif field == _GRAPH_SPARSE:
            yield from _sparse(buf, a, b)
        elif field == _GRAPH_NODE:
            for nf, nw, na, nb in _fields(buf, a, b):
                if nf == _NODE_ATTR and nw == 2:
                    yield from _attribute(buf, na, nb)


def _attribute(buf: memoryview, start: int, end: int) -> Iterator[ExternalRef]:
    for field, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if field in (_ATTR_T, _ATTR_TENSORS) and (ref := _tensor(buf, a, b)):
            yield ref
        elif field in (_ATTR_G, _ATTR_GRAPHS):
            yield from _graph(buf, a, b)
        elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
            yield from _sparse(buf, a, b)


def external_refs(graph: str | Path) -> list[ExternalRef]:
    """Every external-data reference of the ONNX model at ``graph`` (an empty list when it has none)."""
    path = Path(graph)
    try:
        with path.open("rb") as fh:
            if path.stat().st_size == 0:
                raise ExternalDataError(f"{path}: empty file, not an ONNX model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    refs = [r for f, w, a, b in _fields(buf, 0, len(buf)) if f == _MODEL_GRAPH and w == 2
                            for r in _graph(buf, a, b)]
                finally:
                    buf.release()
    except OSError as exc:
        raise ExternalDataError(f"{path}: unreadable ONNX model ({exc})") from exc
    except ExternalDataError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ExternalDataError(f"{path}: {exc}") from exc
    return refs


def external_files(graph: str | Path) -> list[str]:
    """The distinct external-data locations of ``graph``, in first-use order, each checked to be a plain relative
    path inside the graph's directory."""
    seen: dict[str, None] = {}
    for ref in external_refs(graph):
        rel = PurePosixPath(ref.location)
        if rel.is_absolute() or "\\" in ref.location or any(p in ("", ".", "..") for p in rel.parts):
            raise ExternalDataError(f"{graph}: tensor {ref.tensor!r} names external data {ref.location!r} outside "
                                    "the graph's directory")
        seen.setdefault(ref.location, None)
    return list(seen)


def check_external_data(graph: str | Path, listed: Mapping[str, object] | None = None, prefix: str = "") -> list[str]:
    """Check every external-data file ``graph`` references: present beside it, long enough for each tensor's
    ``offset + length``, and (``listed``: a bundle's files, keyed ``prefix + location``) listed there.
    Returns the locations; raises :class:`ExternalDataError` naming the graph, the tensor and the file."""
    path = Path(graph)
    refs = external_refs(path)
    locations = external_files(path)
    sizes: dict[str, int] = {}
    for loc in locations:
        data = path.parent / loc
        if listed is not None and f"{prefix}{loc}" not in listed:
            raise ExternalDataError(f"{path}: its external data file {loc!r} is not part of the bundle "
                                    "(not listed in manifest.json); the graph has no weights without it")
        if not data.is_file():
            raise ExternalDataError(f"{path}: external data file {data} is missing; the graph has no weights "
                                    "without it")
        sizes[loc] = data.stat().st_size
    for ref in refs:
        need = ref.offset + (ref.length or 0)
        if need > sizes[ref.location]:
            raise ExternalDataError(f"{path}: tensor {ref.tensor!r} needs bytes up to {need} of "
                                    f"{path.parent / ref.location}, which holds {sizes[ref.location]}")
    return locations


def graph_files(graph: str | Path, extra_files: Iterable[str | Path], error: type[Exception] = ExternalDataError
                ) -> list[tuple[Path, str]]:
    """``(source, name in the graph's bundle directory)`` of the graph's external-data files (each checked present
    and long enough; a failure raises ``error``), then of ``extra_files`` (by file name)."""
    try:
        data = [(Path(graph).parent / loc, loc) for loc in check_external_data(graph)] if _is_onnx(graph) else []
    except ExternalDataError as exc:
        raise error(str(exc)) from exc
    return [*data, *((Path(p), Path(p).name) for p in extra_files)]


def check_bundle_graphs(root: Path, graphs: Iterable[str], files: Mapping[str, object],
                        error: type[Exception] = ExternalDataError) -> None:
    """Refuse (``error``) a bundle with an ONNX graph whose external data is missing, short or unlisted."""
    for rel in graphs:
        try:
            if _is_onnx(rel):
                check_external_data(root / rel, files, rel.rpartition("/")[0] + "/" if "/" in rel else "")
        except ExternalDataError as exc:
            raise error(str(exc)) from exc


def _is_onnx(path: str | Path) -> bool:
    return str(path).endswith(".onnx")
