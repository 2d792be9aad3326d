"""Qwen2.5-VL vision tower: patch embedding, 2-D RoPE, windowed/full attention blocks, patch merger.

Input is what the image processor produces: flattened patches ``(N, C*T*p*p)`` in merge-aware
order (every ``spatial_merge_size²`` consecutive patches form one merged token) plus ``grid_thw``
``(num_images, 3)`` in patches. Output is one feature per merged token, in the same order, of
width ``out_hidden_size`` (the LM hidden size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .image import preprocess_images
from .image_grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from .image_policy import ImagePolicy
from .lm import MLP, RMSNorm, rotate_half

# Qwen2.5-VL's vision RoPE base; no released checkpoint changes it, so VisionConfig does not carry it.
VISION_ROPE_THETA = 10000.0


def image_inputs(images: Sequence[npt.NDArray[np.uint8]], vision: VisionConfig, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 policy: ImagePolicy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's inputs for ``images``: :func:`blockpilot.vla.image.preprocess_images` (numpy, the one
    implementation) as CPU tensors, float32 patches ``(N, C*T*p*p)`` and ``grid_thw`` ``(num_images, 3)``."""
    patches, grid = preprocess_images(images, vision, min_pixels, max_pixels, policy=policy)
    return torch.from_numpy(patches), torch.from_numpy(grid)


@dataclass(frozen=True)
class VisionLayout:
    """Index tensors that depend only on ``grid_thw`` (computed once per set of image sizes).

    The tower runs in *window order*: merged tokens regrouped so that each attention window is a
    contiguous run. ``unit_order[i]`` is the original index of the merged token at window-order
    position ``i``; ``patch_order`` is the same permutation at patch granularity. ``hw`` holds the
    (row, col) patch coordinate of each patch in window order; ``window_id`` / ``frame_id`` label
    each patch's attention segment for windowed and full attention respectively.
    """

    unit_order: torch.Tensor
    patch_order: torch.Tensor
    hw: torch.Tensor
    window_id: torch.Tensor
    frame_id: torch.Tensor

    def masks(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean block-diagonal masks (windowed, full) of shape ``(N, N)``; True = may attend.

        Built on ``device`` from the labels, so only ``N`` labels cross to an accelerator, not ``N²`` flags.
        """
        window_id, frame_id = self.window_id.to(device), self.frame_id.to(device)
        return window_id[:, None] == window_id[None, :], frame_id[:, None] == frame_id[None, :]


def vision_layout(grid_thw: torch.Tensor, config: VisionConfig) -> VisionLayout:
    """Window order, patch coordinates and attention segments for images of ``grid_thw`` patches."""
    m = config.spatial_merge_size
    # Window side in merged tokens (window_size is in pixels).
    side = config.window_size // (m * config.patch_size)
    unit_orders, hws, windows, frames = [], [], [], []
    unit_offset = window_offset = frame_offset = 0
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"image grid {h}x{w} patches is not a multiple of spatial_merge_size {m}")
        gh, gw = h // m, w // m
        ti, ri, ci = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        ti, ri, ci = ti.flatten(), ri.flatten(), ci.flatten()
        win_rows, win_cols = -(-gh // side), -(-gw // side)
        window = (ti * win_rows + ri // side) * win_cols + ci // side
        # Sort by window, then raster order inside the window; the key is unique per merged token.
        order = torch.argsort(window * side * side + (ri % side) * side + ci % side)
        unit_orders.append(order + unit_offset)
        windows.append(window[order] + window_offset)
        frames.append(ti[order] + frame_offset)
        # Patch coordinates: merged token (r, c) covers patches (r*m + i, c*m + j), i, j raster.
        di, dj = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
        rows = ri[order, None] * m + di.flatten()
        cols = ci[order, None] * m + dj.flatten()
        hws.append(torch.stack((rows.flatten(), cols.flatten()), dim=-1))
        unit_offset += t * gh * gw
        window_offset += t * win_rows * win_cols
        frame_offset += t
    unit = m * m
    unit_order = torch.cat(unit_orders)
    patch_order = (unit_order[:, None] * unit + torch.arange(unit)).flatten()
    return VisionLayout(
        unit_order=unit_order,
        patch_order=patch_order,
        hw=torch.cat(hws),
        window_id=torch.cat(windows).repeat_interleave(unit),
        frame_id=torch.cat(frames).repeat_interleave(unit),
    )


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # Kept as a Conv3d so the weight has the checkpoint's shape (D, C, T, p, p).
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A stride=kernel convolution over exactly one patch is a matmul; linear is faster and exports cleanly.
        weight = self.proj.weight.flatten(1)
        if patches.shape[-1] != weight.shape[1]:
            raise ValueError(f"patches have {patches.shape[-1]} values each, the patch embedding expects "
                             f"{weight.shape[1]} (channels * temporal_patch_size * patch_size²)")
        return F.linear(patches.to(weight.dtype), weight)


class VisionRotary(nn.Module):
    """2-D RoPE: the first half of each rotary half rotates by patch row, the second by patch column."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.quarter = head_dim // 2

    def forward(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hw``: (N, 2) patch coordinates. Returns float32 cos, sin of shape (N, head_dim)."""
        # Frequencies are made here in float32 rather than kept as a buffer, which a bf16 cast
        # of the module would round (and which meta-device construction would leave empty).
        exponents = torch.arange(0, self.quarter, 2, dtype=torch.float32, device=hw.device) / self.quarter
        inv_freq = 1.0 / (VISION_ROPE_THETA**exponents)
        freqs = (hw[..., None].float() * inv_freq).flatten(1)  # (N, 2 * head_dim/4): rows then cols
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, H, d)
        cos, sin = cos[:, None], sin[:, None]
        # Rotate in float32 so low-precision towers keep the positions exact enough.
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        # (1, H, N, d): with a batch dimension SDPA can take a fused kernel on a GPU (without one it falls back to
        # the float32 math path, ~10x slower for a camera image)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             attn_mask=mask)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each group of ``spatial_merge_size²`` patches and projects it to the LM width."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.ln_q(x).reshape(-1, self.mlp[0].in_features)
        out: torch.Tensor = self.mlp(merged)
        return out


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.rotary = VisionRotary(config.head_dim)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor,
                layout: VisionLayout | None = None) -> torch.Tensor:
        """Features ``(num_merged_tokens, out_hidden_size)`` for ``patches`` of images ``grid_thw``.

        ``layout`` may be passed precomputed (``vision_layout``) when the image sizes do not change.
        """
        grid_thw = torch.as_tensor(grid_thw).reshape(-1, 3)
        expected = int(grid_thw.prod(-1).sum())
        if patches.shape[0] != expected:
            raise ValueError(f"got {patches.shape[0]} patches but grid_thw {grid_thw.tolist()} describes {expected}")
        if layout is None:
            layout = vision_layout(grid_thw, self.config)
        device = patches.device
        x = self.patch_embed(patches)[layout.patch_order.to(device)]
        cos, sin = self.rotary(layout.hw.to(device))
        window_mask, full_mask = layout.masks(device)
        full = set(self.config.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_mask if i in full else window_mask)
        merged = self.merger(x)
        # Back from window order to the processor's merged-token order.
        out = torch.empty_like(merged)
        out[layout.unit_order.to(device)] = merged
        return out
