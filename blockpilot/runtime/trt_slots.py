"""Typed value slots on a TensorRT LM-step engine: its ``allowed_table`` ``(C, V)`` bool and ``token_class``
``(1, Tc)`` int64 inputs (engines built since :func:`blockpilot.export.trt_build.build_engine` keeps them as
real inputs; see :mod:`blockpilot.export.typed_slots_graph` for what the graph does with them).

Device layout, fixed for the backend's life (so CUDA graphs, which freeze shapes and addresses, stay valid):

* ``allowed_table`` is one buffer of the profile's largest ``C`` rows, always bound at that shape. Row 0
  allows every token (written once here): prefills and unconstrained steps feed class 0 everywhere. A
  planner's table ``(C', V)`` is uploaded into rows ``1 .. C'`` once per table object (the same array on every
  step of one planner, :class:`~blockpilot.runtime.backend.AllowedTokens`), so ``C'`` may be at most the
  profile's ``C - 1`` (:data:`blockpilot.export.trt_build.MAX_SLOT_CLASSES`).
* ``token_class`` is one buffer of ``capacity`` ids, bound at ``(1, T)`` (the window's length, so a step's
  shapes, hence its CUDA-graph key, are what they were without typed slots). Every forward writes the window's
  classes (each ``+ 1`` for the reserved row) into it from pinned host memory before the engine runs or its
  graph replays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..formats.onnx_spec import TYPED_SLOT_INPUTS
from .backend import AllowedTokens, BackendError
from .plan_types import PlannerSetupError

if TYPE_CHECKING:
    from .cuda_memory import CudaMemory
    from .trt_engine import TrtEngine


class SlotTableError(BackendError):
    """A typed-slot table the engine cannot take (more classes than its profile, another vocabulary)."""


def has_typed_slots(engine: TrtEngine) -> bool:
    """Whether the engine takes the typed-slot inputs (an engine built before them runs unconstrained)."""
    return all(n in engine.inputs for n in TYPED_SLOT_INPUTS)


class SlotFeed:
    """The typed-slot buffers of one LM-step engine and what is written into them per forward."""

    def __init__(self, memory: CudaMemory, engine: TrtEngine, capacity: int, vocab: int) -> None:
        where = engine.path
        kinds = {n: engine.kind(n) for n in TYPED_SLOT_INPUTS}
        if kinds != {"allowed_table": "BOOL", "token_class": "INT64"}:
            raise PlannerSetupError(f"{where}: typed-slot inputs of types {kinds}; the export's are BOOL and INT64")
        rows, table_vocab = engine.max_shape("allowed_table")
        tc_max = engine.max_shape("token_class")[-1]
        if table_vocab != vocab or rows < 2 or tc_max < capacity:
            raise PlannerSetupError(f"{where}: typed-slot profiles allowed_table up to ({rows}, {table_vocab}) and "
                                    f"token_class up to (1, {tc_max}); the backend needs at least (2, {vocab}) and "
                                    f"(1, {capacity}) (rebuild the engine)")
        self.memory, self.rows, self.vocab = memory, int(rows), int(vocab)
        self.table = memory.alloc("allowed_table", engine.nbytes("allowed_table", (self.rows, self.vocab)))
        self.classes = memory.alloc("token_class", engine.nbytes("token_class", (1, capacity)))
        self._classes_host: npt.NDArray[np.int64] = memory.pinned(capacity, np.int64)
        self._staged: npt.NDArray[np.bool_] = memory.pinned((self.rows, self.vocab), np.bool_)
        self._staged[0] = True  # row 0: every token (unconstrained steps); rows past a table are never read
        memory.memset(self.table)
        memory.upload(self.table, self._staged)
        self._source: Any = None  # the table object whose rows are on the device
        self.table_uploads = 0

    @property
    def max_classes(self) -> int:
        """How many classes a planner's table may have (the reserved allow-all row aside)."""
        return self.rows - 1

    def addresses(self) -> dict[str, int]:
        return {"allowed_table": self.table.ptr, "token_class": self.classes.ptr}

    def shapes(self, t: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The input shapes of a forward of ``t`` tokens (the table always at its full, fixed shape)."""
        return ("allowed_table", (self.rows, self.vocab)), ("token_class", (1, t))

    def feed(self, allowed: AllowedTokens | None, t: int) -> None:
        """Queue the classes of a ``t``-token forward (all 0, unconstrained, without ``allowed``), uploading
        ``allowed.table`` first when it is not the table already on the device."""
        if allowed is None:
            self._classes_host[:t] = 0
        else:
            if allowed.table is not self._source:
                self._upload(allowed.table)
            self._classes_host[:t] = allowed.classes[0] + 1
        self.memory.upload(self.classes, self._classes_host[:t])

    def _upload(self, table: npt.NDArray[np.bool_]) -> None:
        c = table.shape[0]
        if c > self.max_classes or table.shape[1] != self.vocab:
            raise SlotTableError(f"typed-slot table of shape {table.shape}: this engine takes up to "
                                 f"{self.max_classes} classes over {self.vocab} tokens (its allowed_table profile; "
                                 "export.trt_build.MAX_SLOT_CLASSES); a schema with fewer distinct slot states, or "
                                 "an engine built with a larger profile, is needed")
        self._staged[1 : 1 + c] = table  # pinned: the asynchronous copy reads it after this returns
        self.memory.upload(self.table, self._staged[: 1 + c])
        self._source = table
        self.table_uploads += 1
