"""Image size arithmetic of the Qwen2-VL processor (smart resize, tokens per frame), torch-free."""

from __future__ import annotations

import math

from .config import VisionConfig

# Qwen2-VL processor defaults: at least 4 merged tokens, at most 1280 (28x28-pixel tokens).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count within ``[min_pixels, max_pixels]``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                         f"{MAX_ASPECT_RATIO}")
    # round() (half to even) rather than floor(x + 0.5): the reference processor rounds this way.
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def image_token_count(height: int, width: int, vision: VisionConfig, min_pixels: int = DEFAULT_MIN_PIXELS,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """How many LM tokens (merged patches) a ``height x width`` still image becomes."""
    factor = vision.patch_size * vision.spatial_merge_size
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    return (h // factor) * (w // factor)
