"""Camera frames -> Qwen2.5-VL vision patches and ``grid_thw``: numpy and Pillow, torch-free.

The one implementation every backend uses (torch through :func:`blockpilot.vla.vision.image_inputs`, ONNX Runtime
and TensorRT through :mod:`blockpilot.runtime.graph_backend`), and the export and training read. It does what the
reference processor (transformers' ``Qwen2VLImageProcessor``) does:

1. resize to the policy's target size (:meth:`~blockpilot.vla.image_policy.ImagePolicy.target_size`: smart
   resize, both sides multiples of ``patch_size * merge_size``) with Pillow's bicubic filter on the uint8 frame;
2. rescale to [0, 1] and normalize with the policy's mean / std (the OpenAI CLIP values by default);
3. repeat the still frame ``temporal_patch_size`` times and cut it into patches ordered merged-token by
   merged-token (each run of ``merge_size²`` patches is one LM token), each patch flattened as
   (channel, time, row, col).

:func:`prompt_images` adds the prompt-level part: every image's patches and grid, the image-token checks and the
M-RoPE positions (:mod:`blockpilot.vla.rope_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from .config import VisionConfig
from .image_grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from .image_policy import ImagePolicy
from .rope_index import Grid, check_image_tokens, image_token_counts, mrope_positions

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
UInt8Image = npt.NDArray[np.uint8]


def check_frame(image: UInt8Image) -> None:
    """Refuse anything but an ``HxWx3`` uint8 RGB frame."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"shape {image.shape} dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {got}")


def resize_bicubic(image: UInt8Image, height: int, width: int) -> UInt8Image:
    """``image`` resized to ``height x width`` with Pillow's bicubic filter, as the reference processor resizes
    (a frame already at that size comes back unchanged)."""
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image), mode="RGB").resize((width, height),
                                                                              Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def patchify(pixels: FloatArray, patch_size: int, merge_size: int, temporal_patch_size: int) -> FloatArray:
    """``(C, H, W)`` normalized pixels -> ``(grid_h * grid_w, C * T * p * p)`` in merged-token order."""
    c, h, w = pixels.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"image {h}x{w} is not a multiple of patch_size * merge_size = {patch_size * merge_size}")
    gh, gw = h // patch_size, w // patch_size
    x = pixels.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # merged row, merged col, row/col in merge, channel, patch row/col
    # A still image is a clip of identical frames; the time axis sits between channel and rows.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size),
                                dtype=np.float32)


def image_patches(image: UInt8Image, policy: ImagePolicy) -> tuple[FloatArray, Grid]:
    """One ``HxWx3`` uint8 RGB frame -> float32 patches ``(N, 3*T*p*p)`` in merged-token order, and its grid
    ``(1, h, w)`` in patches, under ``policy`` (target size and normalization)."""
    check_frame(image)
    h, w = policy.target_size(image.shape[0], image.shape[1])
    resized = resize_bicubic(image, h, w)
    mean = np.asarray(policy.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(policy.image_std, dtype=np.float32)[:, None, None]
    x = resized.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - mean) / std
    patches = patchify(x, policy.patch_size, policy.merge_size, policy.temporal_patch_size)
    return patches, (1, h // policy.patch_size, w // policy.patch_size)


def vision_policy(vision: VisionConfig, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                  policy: ImagePolicy | None = None) -> ImagePolicy:
    """``policy`` checked against the vision tower, or the processor defaults for it within the pixel budget."""
    if vision.in_channels != 3:
        raise ValueError(f"RGB preprocessing needs a 3-channel vision tower, config has {vision.in_channels}")
    if policy is None:
        return ImagePolicy.for_vision(vision, min_pixels=min_pixels, max_pixels=max_pixels)
    policy.check_vision(vision)
    return policy


def preprocess_images(images: Sequence[UInt8Image], vision: VisionConfig, min_pixels: int = DEFAULT_MIN_PIXELS,
                      max_pixels: int = DEFAULT_MAX_PIXELS, *,
                      policy: ImagePolicy | None = None) -> tuple[FloatArray, IntArray]:
    """Several frames (sizes may differ) -> concatenated patches and ``grid_thw`` ``(num_images, 3)``.

    ``policy`` (a checkpoint's :class:`~blockpilot.vla.image_policy.ImagePolicy`) sets the target size and the
    normalization; without one, smart resize within ``[min_pixels, max_pixels]`` and the CLIP mean/std."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    policy = vision_policy(vision, min_pixels, max_pixels, policy)
    parts = [image_patches(image, policy) for image in images]
    return np.concatenate([p for p, _ in parts]), np.array([g for _, g in parts], dtype=np.int64)


@dataclass(frozen=True)
class PromptImages:
    """The host side of a prompt with images: each image's patches and grid, the M-RoPE positions ``(3, 1, T)``
    of the whole prompt and its rope delta."""

    patches: tuple[FloatArray, ...]
    grids: tuple[Grid, ...]
    positions: IntArray
    rope_delta: int

    @property
    def grid_thw(self) -> IntArray:
        return np.array(self.grids, dtype=np.int64).reshape(-1, 3)


def prompt_images(token_ids: IntArray, images: Sequence[UInt8Image], policy: ImagePolicy, image_token_id: int, *,
                  prefill: int | None = None) -> PromptImages:
    """Patches, grids and positions of a one-row prompt with ``images`` (at least one), checked: every frame is
    usable (errors name the image), the prompt holds exactly the image tokens the frames need, and none lies past
    ``prefill``. Raises ``ValueError``; the backends turn it into their prompt error."""
    parts = []
    for i, image in enumerate(images):
        try:
            parts.append(image_patches(image, policy))
        except ValueError as exc:
            raise ValueError(f"image {i}: {exc}") from exc
    grids = tuple(g for _, g in parts)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
    check_image_tokens(ids, image_token_id, image_token_counts(grids, policy.merge_size), prefill=prefill)
    positions, deltas = mrope_positions(ids, grids, image_token_id, policy.merge_size)
    return PromptImages(tuple(p for p, _ in parts), grids, positions, int(deltas[0]))
