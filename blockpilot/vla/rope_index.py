"""Qwen2.5-VL multimodal (3-D) RoPE positions for a prompt with images, and the image-token checks: numpy, torch-free.

This is the one implementation every backend uses (the torch model through :meth:`blockpilot.vla.model.VLAModel.
rope_index`, ONNX Runtime and TensorRT through :mod:`blockpilot.runtime.graph_backend`) and the export traces with.

Text tokens carry one position on all three axes (time, height, width), counting up. The
tokens of an image start at the running position ``p`` and take ``p + t``, ``p + row``,
``p + col`` on the merged grid; text after the image continues at one past the largest
position the image used. Positions therefore run behind cache slots by a constant *rope delta*
once the prompt is over: the token in slot ``s`` has position ``s + delta`` on every axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
Grid = tuple[int, int, int]


def grid_rows(grid_thw: Any) -> list[Grid]:
    """``grid_thw`` (an ``(n, 3)`` array, tensor or list of ``(t, h, w)`` in patches) as a list of int triples."""
    rows = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist()
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def image_token_counts(grid_thw: Any, spatial_merge_size: int) -> list[int]:
    """How many ``<|image_pad|>`` tokens each image of ``grid_thw`` (in patches) takes in the prompt."""
    m2 = spatial_merge_size * spatial_merge_size
    return [t * h * w // m2 for t, h, w in grid_rows(grid_thw)]


def check_image_tokens(token_ids: Any, image_token_id: int, counts: Sequence[int], *,
                       prefill: int | None = None) -> None:
    """Raise ``ValueError`` unless the prompt ``token_ids`` (one row) holds exactly ``sum(counts)`` image tokens
    (``counts``: each image's token count; empty without images) and, with ``prefill``, none past that length."""
    is_image = np.asarray(token_ids).reshape(-1) == image_token_id
    found = int(is_image.sum())
    if not counts:
        if found:
            raise ValueError(f"the prompt holds {found} image tokens but no images were given")
        return
    if found != sum(counts):
        raise ValueError(f"the prompt holds {found} image tokens but its {len(counts)} image(s) need {sum(counts)}")
    if prefill is not None and bool(is_image[prefill:].any()):
        raise ValueError(f"image tokens lie past the prefill length {prefill}; prefill through the images")


def mrope_positions(input_ids: Any, grid_thw: Any | None, image_token_id: int,
                    spatial_merge_size: int) -> tuple[IntArray, IntArray]:
    """Positions ``(3, B, T)`` and rope deltas ``(B,)`` for ``input_ids`` of shape ``(B, T)``.

    Images are taken from ``grid_thw`` in order, row by row; each image consumes exactly its
    count of consecutive image tokens, so adjacent images need no separator. The token in slot
    ``s >= T`` of row ``b`` (a generated token) has position ``s + deltas[b]``.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
    grids = [] if grid_thw is None else grid_rows(grid_thw)
    counts = image_token_counts(grids, spatial_merge_size)
    is_image = ids == image_token_id
    n_tokens = int(is_image.sum())
    if n_tokens != sum(counts):
        raise ValueError(f"the prompt holds {n_tokens} image token(s) but the {len(counts)} image(s) of "
                         f"grid_thw need {sum(counts)} ({counts})")
    batch, length = ids.shape
    positions = np.empty((3, batch, length), dtype=np.int64)
    deltas = np.empty(batch, dtype=np.int64)
    image = 0
    for b in range(batch):
        slot = pos = 0
        for image_run, run in groupby(is_image[b].tolist()):
            run_len = len(list(run))
            if not image_run:
                positions[:, b, slot:slot + run_len] = np.arange(pos, pos + run_len)
                slot, pos = slot + run_len, pos + run_len
                continue
            end = slot + run_len
            while slot < end:
                if slot + counts[image] > end:
                    raise ValueError(f"image {image} needs {counts[image]} consecutive image tokens, "
                                     f"the run at token {slot} has only {end - slot} left")
                t, h, w = grids[image]
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                ti, ri, ci = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                positions[:, b, slot:slot + counts[image]] = np.stack((ti.ravel(), ri.ravel(), ci.ravel())) + pos
                slot, pos = slot + counts[image], pos + max(t, gh, gw)
                image += 1
        deltas[b] = pos - length
    return positions, deltas


def continuation_positions(start: int, length: int, deltas: Any) -> IntArray:
    """Positions ``(3, B, length)`` for tokens in slots ``start .. start+length-1`` after a prompt whose rope
    deltas are ``deltas`` (``(B,)``, or one int for batch one)."""
    rows = np.asarray(deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64)[None, :] + rows,
                           (3, rows.shape[0], length)).copy()
