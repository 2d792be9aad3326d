"""Pinhole cameras mounted on the ego: intrinsics in pixels, mount in the ego frame.

The ego frame is x forward, y left, z up (metres, z = 0 on the ground under the ego's centre).
Cameras look level (no pitch or roll), so that writers can describe them by yaw alone; the front
camera shifts its principal point up instead, which shows more road below the horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from blockpilot.sim.types import FloatArray


class CameraLike(Protocol):
    """Anything with a camera's fields (what the renderer and the format writers read)."""

    @property
    def name(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def fx(self) -> float: ...
    @property
    def fy(self) -> float: ...
    @property
    def cx(self) -> float: ...
    @property
    def cy(self) -> float: ...
    @property
    def x(self) -> float: ...
    @property
    def y(self) -> float: ...
    @property
    def z(self) -> float: ...
    @property
    def yaw(self) -> float: ...


@dataclass(frozen=True)
class CameraSpec:
    name: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    x: float  # mount position in the ego frame
    y: float
    z: float
    yaw: float = 0.0  # radians, counter-clockwise from forward

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"camera {self.name}: size and focal lengths must be positive")
        if self.z <= 0:
            raise ValueError(f"camera {self.name}: mount height must be above the ground, got z={self.z}")

    @classmethod
    def level(cls, name: str, width: int, height: int, hfov_deg: float, x: float, y: float, z: float,
              yaw_deg: float = 0.0, horizon_row: float | None = None) -> CameraSpec:
        """Square pixels from a horizontal field of view; the horizon at ``horizon_row`` (default: centre)."""
        f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
        cy = height / 2 if horizon_row is None else horizon_row
        return cls(name, width, height, f, f, width / 2, cy, x, y, z, math.radians(yaw_deg))

    def intrinsics(self) -> FloatArray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def optical_to_ego(self) -> FloatArray:
        """Rotation (3, 3) from the optical frame (x right, y down, z forward) to the ego frame."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        forward, left, up = np.array([c, s, 0.0]), np.array([-s, c, 0.0]), np.array([0.0, 0.0, 1.0])
        return np.stack([-left, -up, forward], axis=1)


# The planner's input: 112 x 112, about 70 degrees across, horizon a third of the way down.
FRONT_CAMERA = CameraSpec.level("FRONT", 112, 112, 70.0, x=1.5, y=0.0, z=1.6, horizon_row=40.0)

# The eight WOD-E2E camera names around the roof, each 112 x 112.
WOD_CAMERAS: tuple[CameraSpec, ...] = (
    FRONT_CAMERA,
    CameraSpec.level("FRONT_LEFT", 112, 112, 70.0, 1.3, 0.4, 1.6, 45.0, 40.0),
    CameraSpec.level("FRONT_RIGHT", 112, 112, 70.0, 1.3, -0.4, 1.6, -45.0, 40.0),
    CameraSpec.level("SIDE_LEFT", 112, 112, 70.0, 0.2, 0.9, 1.6, 90.0, 40.0),
    CameraSpec.level("SIDE_RIGHT", 112, 112, 70.0, 0.2, -0.9, 1.6, -90.0, 40.0),
    CameraSpec.level("REAR_LEFT", 112, 112, 70.0, -1.6, 0.6, 1.6, 135.0, 40.0),
    CameraSpec.level("REAR", 112, 112, 70.0, -2.1, 0.0, 1.6, 180.0, 40.0),
    CameraSpec.level("REAR_RIGHT", 112, 112, 70.0, -1.6, -0.6, 1.6, -135.0, 40.0),
)


def full_size(camera: CameraSpec, name: str, width: int, height: int) -> CameraSpec:
    """``camera``'s mount and horizontal field of view at a real sensor's resolution, renamed ``name``; the
    horizon keeps its relative row."""
    hfov = math.degrees(2 * math.atan((camera.width / 2) / camera.fx))
    return CameraSpec.level(name, width, height, hfov, camera.x, camera.y, camera.z, math.degrees(camera.yaw),
                            camera.cy / camera.height * height)


# nuScenes' six cameras at their 1600x900 resolution (prompt order: blockpilot.eval.camera_rigs).
NUSCENES_CAMERAS: tuple[CameraSpec, ...] = tuple(
    full_size(cam, channel, 1600, 900) for cam, channel in zip(
        (WOD_CAMERAS[0], WOD_CAMERAS[2], WOD_CAMERAS[1], WOD_CAMERAS[6], WOD_CAMERAS[5], WOD_CAMERAS[7]),
        ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"),
        strict=True))

# WOD-E2E's eight cameras at full size: 1920x1280, the side cameras 1920x886 as in the WOD perception release.
WOD_FULL_SIZE_CAMERAS: tuple[CameraSpec, ...] = tuple(
    full_size(cam, cam.name, 1920, 886 if cam.name.startswith("SIDE") else 1280) for cam in WOD_CAMERAS)
