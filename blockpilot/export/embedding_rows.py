"""A model's token embedding read as float32 a block of rows at a time: the export compares it with the tied head's
initializer and writes ``embed_tokens.npy`` from it without ever holding a float32 copy of the whole table (151,936 x
hidden rows for the published models; 0.93 GB in float32 at 1.5B)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from ..atomic_io import atomic_open

CHUNK_BYTES = 64 << 20


class Float32Rows:
    """``weight`` ``(vocab, hidden)`` in any float dtype; ``rows[a:b]`` is a new float32 array of those rows."""

    itemsize = 4

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError(f"embedding must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))

    def __getitem__(self, rows: slice) -> npt.NDArray[np.float32]:
        return self.weight[rows].to(torch.float32).numpy()  # a float32 weight: a view, no copy

    def save_npy(self, path: str | Path) -> None:
        """Write the table as a float32 ``.npy`` file, block by block."""
        step = max(1, CHUNK_BYTES // (self.shape[1] * self.itemsize))
        with atomic_open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                      "fortran_order": False, "shape": self.shape})
            for i in range(0, self.shape[0], step):
                fh.write(np.ascontiguousarray(self[i:i + step]).tobytes())
