"""Vision graphs of an export: one static ONNX graph per camera resolution.

The vision tower's window layout depends on the patch grid, so each graph is traced for one grid with the
layout baked in as constants (dynamic shapes would need the layout computed inside the graph). Each camera
size asked for (``export --image-size 1600x900``, repeatable) is first resized by the checkpoint's
:class:`~blockpilot.vla.image_policy.ImagePolicy`; sizes that resize to the same grid share one graph. The first
graph keeps the historical name ``vision.onnx``; the others are ``vision_<W>x<H>.onnx`` (the resized size).

The spec's ``vision`` entry keeps the first graph's keys (``file``, ``grid_thw``, ``image_hw``, ``inputs``,
``outputs``) and adds ``graphs`` (every graph, same keys) and ``policy`` (the policy, its ``sizes`` the exported
resized sizes), which the runtime uses to resize any frame to an exported size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.onnx_spec import VISION_FILE
from ..vla.image_policy import ImagePolicy
from ..vla.model import VLAModel
from ..vla.vision import VisionTower, vision_layout
from .fp32_graph import finish_traced_graph, traced_scalars


class VisionStep(nn.Module):
    """The vision tower for one image of a fixed grid, its window layout baked in."""

    def __init__(self, tower: VisionTower, grid_thw: torch.Tensor) -> None:
        super().__init__()
        self.tower = tower
        self.grid = grid_thw
        self.layout = vision_layout(grid_thw, tower.config)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.tower(patches, self.grid, layout=self.layout)
        return out


def vision_file(index: int, size: tuple[int, int]) -> str:
    """The graph file of the ``index``-th exported resized ``size`` ``(height, width)``."""
    return VISION_FILE if index == 0 else f"vision_{size[1]}x{size[0]}.onnx"


def resized_sizes(policy: ImagePolicy, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The distinct smart-resized sizes of ``image_sizes`` (camera ``(height, width)``), in first-seen order."""
    if not image_sizes:
        raise ValueError("export needs at least one camera image size for the vision graph")
    out: list[tuple[int, int]] = []
    for h, w in image_sizes:
        size = policy.smart_size(h, w)
        if size not in out:
            out.append(size)
    return out


def export_vision_graphs(model: VLAModel, out: Path, image_sizes: Sequence[tuple[int, int]],
                         policy: ImagePolicy | None, opset: int, *,
                         trace_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Trace and check one vision graph per resized size into ``out``; return the spec's ``vision`` entry.

    ``trace_dtype`` is the dtype the model is held in (bfloat16/float16: traced as it is, then widened to a float32
    graph by :func:`~.fp32_graph.to_float32_graph`); the graphs' input and output are float32 either way."""

    vision = model.config.vision
    assert vision is not None and model.visual is not None
    policy = policy or ImagePolicy.for_vision(vision)
    policy.check_vision(vision)
    sizes = resized_sizes(policy, image_sizes)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    graphs = []
    for index, (h, w) in enumerate(sizes):
        grid = (1, h // vision.patch_size, w // vision.patch_size)
        patches = grid[1] * grid[2]
        tokens = patches // vision.spatial_merge_size ** 2
        file = vision_file(index, (h, w))
        wrapper = VisionStep(model.visual, torch.tensor([grid], dtype=torch.long)).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, (torch.zeros(patches, width, dtype=trace_dtype),), str(out / file),
                              input_names=["patches"], output_names=["features"], opset_version=opset, dynamo=False)
        # Checked; one <file>.data per graph when its weights go external; a bf16/fp16 trace widened to float32.
        widen = trace_dtype != torch.float32
        scalars = traced_scalars(wrapper, (torch.zeros(patches, width, dtype=trace_dtype),)) if widen else ()
        finish_traced_graph(out / file, widen=widen, scalars=scalars)
        camera = next(s for s in image_sizes if policy.smart_size(*s) == (h, w))
        graphs.append({"file": file, "grid_thw": list(grid), "image_hw": list(camera), "resized_hw": [h, w],
                       "inputs": [{"name": "patches", "shape": [patches, width], "dtype": "float32"}],
                       "outputs": [{"name": "features", "shape": [tokens, vision.out_hidden_size],
                                    "dtype": "float32"}]})
    first = graphs[0]
    return {"file": first["file"], "grid_thw": first["grid_thw"], "image_hw": first["image_hw"],
            "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size, "inputs": first["inputs"], "outputs": first["outputs"],
            "graphs": graphs, "policy": policy.with_sizes(tuple(sizes)).to_dict()}

