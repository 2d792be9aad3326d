"""CUDA graphs of the backend's static-shape step, captured lazily, one per key, into one shared memory pool.

The step function reads every input from static device buffers and returns its outputs; :meth:`TorchStepGraphs.run`
calls it eagerly the first time a key is seen (on a side stream, which also compiles the Triton kernels and
warms the allocator), captures it, and replays the graph for every later call with that key. The first call's
eager result is returned as is: a capture only records, so the cache writes it would make happen once, in the
eager run. Outputs of one graph live in the shared pool until another graph replays: read them before the
next step (the backend copies them to the host at once). With ``enabled=False`` every call runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

StepOutputs = tuple[Any, ...]


class TorchStepGraphs:
    """The ``cuda`` backend's CUDA graphs of a torch step function (the TensorRT backend's are
    :class:`~blockpilot.runtime.trt_engine.TrtStepGraphs`)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, StepOutputs]] = {}
        self._pool: Any = None
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def run(self, key: Hashable, step: Callable[[], StepOutputs]) -> StepOutputs:
        if not self.enabled:
            return step()
        found = self._graphs.get(key)
        if found is not None:
            graph, outputs = found
            graph.replay()
            return outputs
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            eager = step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = step()
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = (graph, outputs)
        self.captures += 1
        return eager

    def reset(self) -> None:
        """Drop every graph (and with them the pool's memory)."""
        self._graphs.clear()
        self._pool = None
