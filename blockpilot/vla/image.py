"""Camera image -> flattened vision patches + ``grid_thw``, as Qwen2-VL's image processor lays them out.

Steps: resize so both sides are multiples of ``patch_size * spatial_merge_size`` with the pixel
count inside ``[min_pixels, max_pixels]`` (aspect ratio kept as well as possible); rescale to
[0, 1]; normalize with the CLIP mean/std; repeat the frame ``temporal_patch_size`` times; cut
into patches ordered merged-token by merged-token (each run of ``spatial_merge_size²`` patches
is one LM token), each patch flattened as (channel, time, row, col).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import VisionConfig
from .image_grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize
from .image_policy import CLIP_MEAN, CLIP_STD, ImagePolicy

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess_image", "preprocess_images", "resize_bicubic", "smart_resize"]

def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of an ``HxWx3`` uint8 image, rounded back to uint8.

    torch's antialiased bicubic uses the same kernel as PIL's, so results stay within a grey
    level or so of the reference processor while being deterministic and dependency-free.
    """
    if image.shape[:2] == (height, width):
        return image
    x = torch.tensor(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """``(C, H, W)`` normalized pixels -> ``(grid_h * grid_w, C * T * p * p)`` in merged-token order."""
    c, h, w = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"image {h}x{w} is not a multiple of patch_size * merge_size = {patch_size * merge_size}")
    x = pixels.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    # -> (merged row, merged col, row in merge, col in merge, channel, patch row, patch col)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)
    # A still image is a clip of identical frames; the time axis sits between channel and rows.
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def preprocess_image(image: np.ndarray, vision: VisionConfig, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS, *,
                     policy: ImagePolicy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``HxWx3`` uint8 RGB image -> float32 patches ``(N, C*T*p*p)`` and ``grid_thw`` ``(1, 3)``.

    ``policy`` (a checkpoint's :class:`~blockpilot.vla.image_policy.ImagePolicy`) sets the target size and the
    normalization; without one, smart resize within ``[min_pixels, max_pixels]`` and the CLIP mean/std."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    if vision.in_channels != 3:
        raise ValueError(f"RGB preprocessing needs a 3-channel vision tower, config has {vision.in_channels}")
    if policy is None:
        policy = ImagePolicy.for_vision(vision, min_pixels=min_pixels, max_pixels=max_pixels)
    policy.check_vision(vision)
    h, w = policy.target_size(image.shape[0], image.shape[1])
    resized = resize_bicubic(image, h, w)
    x = torch.tensor(resized).permute(2, 0, 1).float() * (1.0 / 255.0)  # copies: ROS buffers are read-only
    mean = torch.tensor(policy.image_mean).view(3, 1, 1)
    std = torch.tensor(policy.image_std).view(3, 1, 1)
    x = (x - mean) / std
    patches = patchify(x, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    grid = torch.tensor([[1, h // vision.patch_size, w // vision.patch_size]], dtype=torch.long)
    return patches, grid


def preprocess_images(images: Sequence[np.ndarray], vision: VisionConfig, min_pixels: int = DEFAULT_MIN_PIXELS,
                      max_pixels: int = DEFAULT_MAX_PIXELS, *,
                      policy: ImagePolicy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images (sizes may differ) -> concatenated patches and ``grid_thw`` ``(num_images, 3)``."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    parts = [preprocess_image(im, vision, min_pixels, max_pixels, policy=policy) for im in images]
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
