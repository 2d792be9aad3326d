"""What every format writer shares: the camera shape it needs, JPEG bytes, resampling a track
at arbitrary times, rotations as quaternions, and the synthetic label."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import cast

import numpy as np
import numpy.typing as npt

from blockpilot.sim.cameras import CameraLike
from blockpilot.sim.types import FloatArray, Scene, Track

SYNTHETIC_LABEL = "SYNTHETIC (blockpilot sim)"
# Messages and records carry absolute times; synthetic scenes start at fixed, clearly fake
# instants (2023-11-14T22:13:20Z plus one hour per scene) so that the same scenes give the same bytes.
BASE_TIME_US = 1_700_000_000_000_000
SCENE_SPACING_US = 3_600_000_000
JPEG_QUALITY = 90


RenderFn = Callable[[Scene, int, CameraLike], npt.NDArray[np.uint8]]


def default_render() -> RenderFn:
    from blockpilot.sim.render import render_camera

    return cast(RenderFn, render_camera)


def render_jpeg(render: RenderFn, scene: Scene, step: int, camera: CameraLike) -> bytes:
    image = render(scene, step, camera)
    if image.shape != (camera.height, camera.width, 3) or image.dtype != np.uint8:
        raise ValueError(f"render gave {image.shape} {image.dtype} for camera {camera.name}, "
                         f"expected ({camera.height}, {camera.width}, 3) uint8")
    return encode_jpeg(image)


def encode_jpeg(image: npt.NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
        buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def scene_start_us(ordinal: int) -> int:
    return BASE_TIME_US + ordinal * SCENE_SPACING_US


def step_time_us(scene: Scene, step: int) -> int:
    return round(step * scene.dt * 1e6)


def steps_at_rate(scene: Scene, rate_hz: float, start_s: float = 0.0, end_s: float | None = None) -> list[int]:
    """Scene steps nearest to ``start_s, start_s + 1/rate_hz, ...`` up to ``end_s`` (default: the end)."""
    if rate_hz <= 0:
        raise ValueError(f"rate must be positive, got {rate_hz}")
    end = scene.duration_s if end_s is None else end_s
    steps: list[int] = []
    k = 0
    while start_s + k / rate_hz <= end + 1e-9:
        step = scene.step_at(start_s + k / rate_hz)
        if not steps or step != steps[-1]:
            steps.append(step)
        k += 1
    return steps


def sample_track(track: Track, dt: float, times: FloatArray) -> FloatArray:
    """States (N, 5) at ``times`` (seconds from the track's first step), linearly interpolated;
    yaw is unwrapped first so that it interpolates across ±pi."""
    t = np.asarray(times, dtype=np.float64)
    grid = np.arange(track.states.shape[0], dtype=np.float64) * dt
    if t.size and (t.min() < -1e-9 or t.max() > grid[-1] + 1e-9):
        raise ValueError(f"times {t.min():.2f}..{t.max():.2f} s outside the track (0..{grid[-1]:.2f} s)")
    cols = track.states.copy()
    cols[:, 2] = np.unwrap(cols[:, 2])
    return np.stack([np.interp(t, grid, cols[:, j]) for j in range(5)], axis=1)


def yaw_rate(track: Track, dt: float) -> FloatArray:
    yaw = np.unwrap(track.yaw)
    if yaw.size < 2:
        return np.zeros_like(yaw)
    return np.gradient(yaw, dt)


def yaw_quaternion(yaw: float) -> list[float]:
    """Rotation about +z as a quaternion [w, x, y, z]."""
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def matrix_quaternion(rot: FloatArray) -> list[float]:
    """A proper rotation matrix (3, 3) as a quaternion [w, x, y, z] with w >= 0."""
    m = np.asarray(rot, dtype=np.float64)
    trace = float(np.trace(m))
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, 0.0]
        q[0] = (m[k, j] - m[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + k] = (m[k, i] + m[i, k]) / s
    out = np.asarray(q, dtype=np.float64)
    out = -out if out[0] < 0 else out
    return [float(v) for v in out / np.linalg.norm(out)]


def camera_axes_in_ego(camera: CameraLike) -> FloatArray:
    """Columns: the camera's forward, left and up axes in the ego frame."""
    c, s = np.cos(camera.yaw), np.sin(camera.yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def optical_rotation(camera: CameraLike) -> FloatArray:
    """Optical frame (x right, y down, z forward) to ego frame."""
    fwd_left_up = camera_axes_in_ego(camera)
    return np.stack([-fwd_left_up[:, 1], -fwd_left_up[:, 2], fwd_left_up[:, 0]], axis=1)


def project_to_image(camera: CameraLike, points_ego: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Pixel coordinates (N, 2) and depth (N,) of ego-frame points (N, 3)."""
    rel = np.asarray(points_ego, dtype=np.float64) - np.array([camera.x, camera.y, camera.z])
    cam = rel @ optical_rotation(camera)
    depth = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = camera.fx * cam[:, 0] / depth + camera.cx
        v = camera.fy * cam[:, 1] / depth + camera.cy
    return np.stack([u, v], axis=1), depth


def synthetic_name(scene: Scene) -> str:
    """The scene's name, prefixed so that it says it is synthetic wherever it is written."""
    return scene.name if "synthetic" in scene.name.lower() else f"synthetic-{scene.name}"
