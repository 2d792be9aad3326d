"""Image decoding shared by the replay sources: encoded bytes (JPEG, PNG) and raw ROS pixel buffers
to RGB ``uint8`` arrays, with :class:`SampleError` naming the image when it cannot be used."""

from __future__ import annotations

import io

import numpy as np

from .types import ImageArray, SampleError

RAW_ENCODINGS = ("rgb8", "bgr8", "mono8")


def decode_image(data: bytes, what: str) -> ImageArray:
    """RGB ``(H, W, 3)`` uint8 of an encoded image (any format Pillow reads); ``what`` names it in errors."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleError(f"{what}: corrupt image ({type(exc).__name__}: {exc})") from exc
    return np.array(rgb, dtype=np.uint8)


def decode_raw(data: bytes, encoding: str, height: int, width: int, step: int, what: str) -> ImageArray:
    """RGB ``(H, W, 3)`` uint8 of a raw pixel buffer (``sensor_msgs/Image`` with rgb8, bgr8 or mono8)."""
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1}.get(encoding.lower())
    if channels is None:
        raise SampleError(f"{what}: unsupported encoding {encoding!r} (use one of {', '.join(RAW_ENCODINGS)})")
    if height <= 0 or width <= 0 or step < width * channels or len(data) < height * step:
        raise SampleError(f"{what}: {len(data)} bytes do not hold a {width}x{height} {encoding} image "
                          f"with row step {step}")
    rows = np.frombuffer(data, dtype=np.uint8, count=height * step).reshape(height, step)
    pixels = rows[:, : width * channels].reshape(height, width, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    return (pixels[..., ::-1] if encoding.lower() == "bgr8" else pixels).copy()
