"""The token embedding table the graph backends look ids up in, wherever an export keeps it.

An untied model (and every export made before this) ships ``embed_tokens.npy`` (``"embed_file"`` in the spec). A
model with a tied embedding keeps one copy: the LM head initializer of ``lm_step.onnx``, named in the spec as
``"embed": {"graph": "lm_step.onnx", "tensor": <initializer>, "layout": "rows" | "columns"}``: ``rows`` is the
``(vocab, hidden)`` table itself, ``columns`` its transpose ``(hidden, vocab)`` (the MatMul weight that
``torch.onnx.export`` folds ``x @ W.T`` into). Either file is memory-mapped; a lookup reads only its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import BlockpilotError
from .onnx_tensor import TensorLocationError, find_initializer, initializers, map_initializer, to_float32

LAYOUTS = ("rows", "columns")


class RowBlocks(Protocol):
    """A ``(vocab, hidden)`` table read a block of rows at a time as float32 (e.g. a bf16 weight widened per block,
    so no float32 copy of the whole table is made)."""

    shape: tuple[int, int]
    itemsize: int

    def __getitem__(self, rows: slice) -> npt.NDArray[np.float32]: ...


class EmbeddingError(BlockpilotError, ValueError):
    """An export's embedding table is missing or does not match its spec; names the file and the tensor."""


class EmbeddingTable:
    """Token rows ``(vocab, hidden)`` of an export in ``onnx_dir`` (its loaded ``spec``), memory-mapped.

    ``table[ids]`` returns a new float32 array ``(len(ids), hidden)``."""

    def __init__(self, spec: dict[str, Any], onnx_dir: str | Path) -> None:
        root = Path(onnx_dir)
        vocab, hidden = int(spec["vocab_size"]), int(spec["hidden_size"])
        entry = spec.get("embed")
        self.data_type = 1
        if entry is None:
            path = root / str(spec.get("embed_file") or "embed_tokens.npy")
            if not path.is_file():
                raise EmbeddingError(f"{path}: the export's token embedding table is missing")
            self._table: np.ndarray[Any, Any] = np.load(path, mmap_mode="r")
            self.layout, self.source = "rows", str(path)
        else:
            layout = entry.get("layout")
            if layout not in LAYOUTS:
                raise EmbeddingError(f"{root / 'onnx_spec.json'}: embed.layout {layout!r} is not one of {LAYOUTS}")
            graph = root / str(entry.get("graph", ""))
            try:
                tensor = find_initializer(graph, str(entry.get("tensor")))
                self._table = map_initializer(tensor)
            except TensorLocationError as exc:
                raise EmbeddingError(f"token embedding (tied to the LM head): {exc}") from exc
            self.layout, self.data_type = str(layout), tensor.data_type
            self.source = f"{tensor.file} (initializer {tensor.name!r} of {graph.name})"
        shape = (vocab, hidden) if self.layout == "rows" else (hidden, vocab)
        if tuple(self._table.shape) != shape:
            raise EmbeddingError(f"{self.source}: shape {list(self._table.shape)}, but the spec's vocab_size "
                                 f"{vocab} and hidden_size {hidden} need {list(shape)} ({self.layout})")
        self.vocab, self.hidden = vocab, hidden

    @property
    def shape(self) -> tuple[int, int]:
        return self.vocab, self.hidden

    def __getitem__(self, ids: Any) -> npt.NDArray[np.float32]:
        index = np.asarray(ids, dtype=np.int64)
        if index.ndim != 1:
            raise ValueError(f"embedding lookup takes a 1-D id array, got shape {index.shape}")
        rows = self._table[index] if self.layout == "rows" else self._table[:, index].T
        return np.ascontiguousarray(to_float32(rows, self.data_type))


def locate_tied_embedding(graph: str | Path, weight: npt.NDArray[np.float32] | RowBlocks) -> dict[str, str] | None:
    """The spec entry naming the initializer of ``graph`` that holds ``weight`` ``(vocab, hidden)`` exactly, as rows
    or transposed; ``None`` when no initializer does (e.g. a quantized head), so the export keeps its own table."""
    vocab, hidden = weight.shape
    for tensor in initializers(graph):
        if tensor.data_type != 1 or tensor.dims not in ((vocab, hidden), (hidden, vocab)):
            continue
        stored = map_initializer(tensor)
        for layout, view in (("rows", stored), ("columns", stored.T)):
            if tuple(view.shape) == tuple(weight.shape) and _equal(view, weight):
                return {"graph": Path(graph).name, "tensor": tensor.name, "layout": layout}
    return None


def _equal(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any] | RowBlocks, chunk_bytes: int = 64 << 20) -> bool:
    """``a == b`` everywhere, compared a block of rows at a time (no table-sized temporary)."""
    step = max(1, chunk_bytes // max(1, b.shape[1] * b.itemsize))
    return all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, b.shape[0], step))
