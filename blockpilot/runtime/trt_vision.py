"""The TensorRT backend's vision engines: one static engine per exported camera size (patch grid), each with
its own fixed input / output buffers and execution context, over the backend's shared scratch.

Which engine runs a frame is decided before any engine runs, by the export's image policy restricted to the
sizes that have an engine (:meth:`blockpilot.vla.image_policy.ImagePolicy.target_size`: the frame's smart size
when it was exported, else the exported size nearest in aspect ratio, ties to the larger), the same choice the
ONNX Runtime backend makes over its vision graphs; the frame is resized to that size and its patch grid picks
the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..formats.onnx_spec import vision_graphs
from .backend import PromptError
from .plan_types import PlannerSetupError
from .trt_engine import TrtEngine, bind, enqueue

if TYPE_CHECKING:
    from ..formats.bundle import Artifact, Bundle
    from ..vla.image_policy import ImagePolicy
    from .cuda_memory import CudaMemory, DeviceBuffer

Grid = tuple[int, int, int]
VisionEngineArg = str | Path | Mapping[Grid, str | Path] | None


def graph_sizes(spec: dict[str, Any]) -> dict[Grid, tuple[int, int]]:
    """Each exported vision graph's patch grid and the ``(height, width)`` a frame is resized to for it."""
    vision = spec["vision"]
    patch = int(vision["patch_size"])
    out: dict[Grid, tuple[int, int]] = {}
    for graph in vision_graphs(vision):
        t, h, w = (int(x) for x in graph["grid_thw"])
        resized = graph.get("resized_hw") or (h * patch, w * patch)
        out[(t, h, w)] = (int(resized[0]), int(resized[1]))
    return out


def engine_paths(spec: dict[str, Any], vision_engine: VisionEngineArg) -> dict[Grid, Path]:
    """The vision engine of each patch grid: a single path is the first exported graph's engine (an export with
    one camera size, or a caller that built only that one); a mapping names each engine's grid, which must be
    one of the export's vision graphs. Empty without vision."""
    if vision_engine is None:
        return {}
    if spec.get("vision") is None:
        raise PlannerSetupError("a vision engine was given but the export has no vision graph")
    sizes = graph_sizes(spec)
    if not isinstance(vision_engine, Mapping):
        return {next(iter(sizes)): Path(vision_engine)}
    unknown = [g for g in vision_engine if tuple(g) not in sizes]
    if unknown:
        raise PlannerSetupError(f"vision engines for patch grids {unknown}: the export's vision graphs have "
                                f"grids {list(sizes)}")
    return {(int(g[0]), int(g[1]), int(g[2])): Path(p) for g, p in vision_engine.items()}


def engine_policy(policy: ImagePolicy, spec: dict[str, Any], grids: list[Grid]) -> ImagePolicy:
    """``policy`` restricted to the sizes that have an engine (in the export's order), so every frame is resized
    to one of them."""
    sizes = graph_sizes(spec)
    have = [sizes[g] for g in grids]
    kept = tuple(s for s in policy.sizes if s in have) or tuple(dict.fromkeys(have))
    return policy.with_sizes(kept)


def artifact_grid(artifact: Artifact) -> Grid | None:
    """The patch grid a vision graph's or engine's manifest entry records (``None`` for an export from before
    one vision graph per camera size)."""
    graph = artifact.io.get("graph") if isinstance(artifact.io, dict) else None
    if not isinstance(graph, dict) or "grid_thw" not in graph:
        return None
    t, h, w = (int(x) for x in graph["grid_thw"])
    return t, h, w


def vision_engine_artifacts(bundle: Bundle, chosen: Artifact) -> dict[Grid | None, Artifact]:
    """Every vision engine of ``bundle`` built like ``chosen`` (same target, compute capability, precision and
    variant), by the patch grid its manifest entry records; ``{None: chosen}`` where an engine records none."""
    siblings = [a for a in bundle.engines(chosen.target) if a.role == "vision" and a.sm == chosen.sm
                and a.precision == chosen.precision and a.variant == chosen.variant]
    grids = {artifact_grid(a): a for a in siblings}
    return {None: chosen} if None in grids else dict(grids)


def bundle_vision_engines(bundle: Bundle, chosen: Artifact) -> str | Path | dict[Grid, Path]:
    """The ``vision_engine`` argument of :class:`~blockpilot.runtime.trt_backend.TrtBackend` for a bundle: each
    grid's engine file (:func:`vision_engine_artifacts`), or ``chosen``'s file alone for an older export."""
    found = vision_engine_artifacts(bundle, chosen)
    return {g: bundle.file(a.path) for g, a in found.items() if g is not None} if None not in found \
        else bundle.file(chosen.path)


class VisionEngines:
    """The loaded vision engines by patch grid; :meth:`encode` runs one image's patches on its grid's engine."""

    def __init__(self, memory: CudaMemory, engines: Mapping[Grid, TrtEngine], merge_size: int) -> None:
        self.memory, self.merge2 = memory, merge_size * merge_size
        self._io: dict[Grid, tuple[Any, DeviceBuffer, DeviceBuffer, tuple[int, ...]]] = {}
        self.engines = dict(engines)
        for grid, engine in self.engines.items():
            self._io[grid] = self._setup(engine, grid)
        self.runs: dict[Grid, int] = {g: 0 for g in self.engines}

    @property
    def grids(self) -> list[Grid]:
        return list(self.engines)

    def encode(self, patches: npt.NDArray[np.float32], grid: Grid) -> npt.NDArray[np.float32]:
        """One image's features from the engine built for ``grid``."""
        engine = self.engines.get(tuple(grid))  # type: ignore[arg-type]
        if engine is None:  # the policy resizes to sizes with an engine only: a spec and engines that disagree
            raise PlannerSetupError(f"no vision engine for the patch grid {grid}; the vision engines were built for "
                                    f"{sorted(self.engines)}")
        context, inp, out, out_shape = self._io[tuple(grid)]  # type: ignore[index]
        if patches.shape[0] != grid[0] * grid[1] * grid[2] or out_shape[0] * self.merge2 != patches.shape[0]:
            raise PromptError(f"image patch grid {grid}: the vision engine {engine.path} was built for "
                              f"{out_shape[0] * self.merge2} patches")
        self.memory.upload(inp, np.ascontiguousarray(patches, dtype=engine.dtype(inp.name)))
        enqueue(context, self.memory.stream, f"vision {grid}")
        features = np.empty(out_shape, dtype=engine.dtype(out.name))
        self.memory.download(features, out)
        self.memory.synchronize()
        self.runs[tuple(grid)] += 1  # type: ignore[index]
        return features.astype(np.float32, copy=False)

    def close(self) -> None:
        """Drop the contexts before their engines."""
        self._io.clear()
        self.engines.clear()

    def _setup(self, engine: TrtEngine, grid: Grid) -> tuple[Any, DeviceBuffer, DeviceBuffer, tuple[int, ...]]:
        if len(engine.inputs) != 1 or len(engine.outputs) != 1:
            raise PlannerSetupError(f"{engine.path}: inputs {engine.inputs}, outputs {engine.outputs}; expected one "
                                    "each (patches -> features)")
        (name_in,), (name_out,) = engine.inputs, engine.outputs
        shape_in, shape_out = (tuple(int(d) for d in engine.engine.get_tensor_shape(n)) for n in (name_in, name_out))
        if any(d < 0 for d in (*shape_in, *shape_out)):
            raise PlannerSetupError(f"{engine.path}: dynamic shapes {shape_in} -> {shape_out}; the vision engine "
                                    "of an export is static (one image grid)")
        if shape_in[0] != grid[0] * grid[1] * grid[2]:
            raise PlannerSetupError(f"{engine.path}: takes {shape_in[0]} patches, the vision graph of grid {grid} "
                                    f"has {grid[0] * grid[1] * grid[2]}")
        inp = self.memory.alloc(f"{name_in} {grid}", engine.nbytes(name_in, shape_in))
        out = self.memory.alloc(f"{name_out} {grid}", engine.nbytes(name_out, shape_out))
        context = engine.context()
        bind(context, {name_in: inp.ptr, name_out: out.ptr}, engine.path)
        return context, inp, out, shape_out
