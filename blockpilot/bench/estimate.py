"""Plan latency of the full-size shapes, put together from parts measured in the same run.

A random-weight model plans nonsense, and how many forwards a plan takes depends on what the model predicts, so
the latency of a Fast-dDrive-sized plan is estimated: the forwards of a real plan of the reference model with
the same decoder (``prefill_forwards`` prefills and the rest block steps), each priced at what the large shape
measured on the same backend and dtype::

    plan_ms = vision_ms + prefill_forwards * prefill_ms + (forwards - prefill_forwards) * step_ms

``vision_ms`` is one forward of a random Qwen2.5-VL vision tower of the model's size (the 3B one: 32 blocks,
hidden 1280, 16 heads, windowed attention with full attention at blocks 7/15/23/31, merger to 2048) on one camera
image of ``image`` pixels; ``prefill_ms`` is a ``kv_tokens``-token prompt; ``step_ms`` a block step over that
cache. Every block step is priced at the cache's full length, so the estimate errs high.
"""

from __future__ import annotations

from typing import Any

import torch

from ..vla.config import VisionConfig
from ..vla.vision import VisionTower, vision_layout
from .measure import p50_ms
from .models import DTYPES, default_dtype, init_random_

# Qwen2.5-VL-3B-Instruct's vision_config (the tower Fast-dDrive keeps); 1.5b is a text-only LM.
VISION_SHAPES: dict[str, VisionConfig] = {
    "3b": VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
}


def random_vision(name: str, dtype: str, device: torch.device, seed: int = 0) -> VisionTower:
    """The vision tower of shape ``name`` with Normal(0, 0.02) weights, built on ``device`` in the activation dtype
    (fp8 runs the tower in bf16: only the LM's linears are FP8)."""
    with default_dtype(DTYPES[dtype]), torch.device("meta"):
        tower = VisionTower(VISION_SHAPES[name])
    return init_random_(tower.to_empty(device=device), seed)


def image_grid(height: int, width: int, config: VisionConfig) -> tuple[int, int]:
    """Patch rows and columns of one camera image, each a multiple of the merge size (pixels are rounded down)."""
    unit = config.patch_size * config.spatial_merge_size
    if height < unit or width < unit:
        raise ValueError(f"image {height}x{width} is smaller than one merged patch ({unit}x{unit} pixels)")
    m = config.spatial_merge_size
    return height // unit * m, width // unit * m


def vision_ms(name: str, dtype: str, device: torch.device, image: tuple[int, int], repeats: int) -> dict[str, Any]:
    """p50 ms of one vision-tower forward on one image of ``image`` (height, width) pixels, and its token count."""
    tower = random_vision(name, dtype, device)
    config = tower.config
    rows, cols = image_grid(*image, config)
    grid = torch.tensor([[1, rows, cols]])
    layout = vision_layout(grid, config)
    width = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    patches = torch.randn(rows * cols, width, device=device, dtype=DTYPES[dtype])
    with torch.inference_mode():
        ms = p50_ms(lambda: tower(patches, grid, layout), device, repeats, warmup=2)
    tokens = rows * cols // config.spatial_merge_size ** 2
    return {"vision_ms": ms, "image": f"{image[0]}x{image[1]}", "image_tokens": tokens}


def plan_estimates(steps: list[dict[str, Any]], plans: list[dict[str, Any]],
                   vision: dict[tuple[str, str], dict[str, Any]],
                   hf_ms_per_token: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """One row per large-shape step row and reference-model plan row of the same backend and dtype.
    ``hf_ms_per_token``: ``transformers`` ``generate``'s ms per token per model (bf16), for the answer tokens per
    second of the estimated plan against it (``x_transformers``)."""
    rows = []
    for step in steps:
        if step["model"] == "reference" or step.get("prefill_ms") is None:
            continue
        parts = vision.get((step["model"], step["dtype"]), {})
        for plan in plans:
            if plan["backend"] != step["backend"] or plan["dtype"] != step["dtype"]:
                continue
            prefills = int(plan.get("prefill_forwards") or 1)
            steps_n = int(plan["forwards"]) - prefills
            ms = parts.get("vision_ms", 0.0) + prefills * step["prefill_ms"] + steps_n * step["step_ms"]
            tokens = plan.get("tokens")
            per_s = None if not tokens else tokens / ms * 1e3
            hf = (hf_ms_per_token or {}).get(step["model"])
            speedup = None if per_s is None or not hf else per_s * hf / 1e3
            rows.append({"model": step["model"], "dtype": step["dtype"], "backend": step["backend"],
                         "decoder": plan["decoder"], "forwards": plan["forwards"], "prefill_forwards": prefills,
                         "tokens_per_forward": plan["tokens_per_forward"], "prompt_tokens": step["kv_tokens"],
                         "prefill_ms": step["prefill_ms"], "step_ms": step["step_ms"],
                         "vision_ms": parts.get("vision_ms"), "image": parts.get("image"),
                         "image_tokens": parts.get("image_tokens"), "plan_ms": ms, "tokens": tokens,
                         "tokens_per_s": per_s, "x_transformers": speedup})
    return rows
