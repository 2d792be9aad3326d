"""Qwen2.5-VL multimodal (3-D) RoPE positions for a prompt with images.

Text tokens carry one position on all three axes (time, height, width), counting up. The
tokens of an image start at the running position ``p`` and take ``p + t``, ``p + row``,
``p + col`` on the merged grid; text after the image continues at one past the largest
position the image used. Positions therefore run behind cache slots by a constant *rope delta*
once the prompt is over: the token in slot ``s`` has position ``s + delta`` on every axis.
"""

from __future__ import annotations

from itertools import groupby

import torch


def image_token_counts(grid_thw: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """How many ``<|image_pad|>`` tokens each image of ``grid_thw`` (in patches) takes in the prompt."""
    m2 = spatial_merge_size * spatial_merge_size
    return [t * h * w // m2 for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]


def mrope_positions(
    input_ids: torch.Tensor,
    grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(3, B, T)`` and rope deltas ``(B,)`` for ``input_ids`` of shape ``(B, T)``.

    Images are taken from ``grid_thw`` in order, row by row; each image consumes exactly its
    count of consecutive image tokens, so adjacent images need no separator. The token in slot
    ``s >= T`` of row ``b`` (a generated token) has position ``s + deltas[b]``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    counts = [] if grid_thw is None else image_token_counts(grid_thw, spatial_merge_size)
    grids = [] if grid_thw is None else torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
    is_image = input_ids == image_token_id
    n_tokens = int(is_image.sum())
    if n_tokens != sum(counts):
        raise ValueError(f"the prompt holds {n_tokens} image token(s) but the {len(counts)} image(s) of "
                         f"grid_thw need {sum(counts)} ({counts})")
    batch, length = input_ids.shape
    positions = torch.empty(3, batch, length, dtype=torch.long)
    deltas = torch.empty(batch, dtype=torch.long)
    image = 0
    for b in range(batch):
        slot = pos = 0
        for image_run, run in groupby(is_image[b].tolist()):
            run_len = len(list(run))
            if not image_run:
                positions[:, b, slot:slot + run_len] = torch.arange(pos, pos + run_len)
                slot, pos = slot + run_len, pos + run_len
                continue
            end = slot + run_len
            while slot < end:
                if slot + counts[image] > end:
                    raise ValueError(f"image {image} needs {counts[image]} consecutive image tokens, "
                                     f"the run at token {slot} has only {end - slot} left")
                t, h, w = grids[image]
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                ti, ri, ci = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                grid = torch.stack((ti.flatten(), ri.flatten(), ci.flatten()))
                positions[:, b, slot:slot + counts[image]] = grid + pos
                slot, pos = slot + counts[image], pos + max(t, gh, gw)
                image += 1
        deltas[b] = pos - length
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def continuation_positions(start: int, length: int, deltas: torch.Tensor) -> torch.Tensor:
    """Positions ``(3, B, length)`` for tokens in slots ``start .. start+length-1`` after a prompt."""
    slots = torch.arange(start, start + length, device=deltas.device)
    return (slots[None, :] + deltas.reshape(-1, 1))[None].expand(3, -1, -1)
