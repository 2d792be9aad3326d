"""Small rigid-transform helpers: the ego frame, quaternions [w, x, y, z] and 3-D poses (numpy only).

A leaf module (it imports nothing from blockpilot): the generated scenes (``sim``), the replay sources
(``eval``), the training labels and the ROS nodes all write trajectories in the same ego frame.

A :class:`Pose` maps points of its own frame into the parent frame (``parent = R @ local + t``),
the way nuScenes stores ``ego_pose`` (ego in the global frame) and ``calibrated_sensor`` (sensor in
the ego frame).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def to_ego_frame(points: npt.ArrayLike, origin_xy: npt.ArrayLike, origin_yaw: float) -> FloatArray:
    """Parent-frame points ``(N, 2)`` into the ego frame at ``origin_xy`` heading ``origin_yaw`` (x forward,
    y left): the frame every plan and ground-truth trajectory is written in."""
    c, s = math.cos(origin_yaw), math.sin(origin_yaw)
    d = np.asarray(points, dtype=np.float64) - np.asarray(origin_xy, dtype=np.float64)
    return np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]])


def constant_velocity(speed_mps: float, times_s: npt.ArrayLike) -> FloatArray:
    """The constant-velocity baseline in the ego frame: keep the current speed along the current heading (x
    forward); ``(N, 2)`` positions at ``times_s`` seconds from now."""
    t = np.asarray(times_s, dtype=np.float64)
    return np.stack([speed_mps * t, np.zeros_like(t)], axis=1)


def quaternion_matrix(q: Sequence[float] | FloatArray) -> FloatArray:
    """The rotation matrix (3, 3) of a quaternion [w, x, y, z]; it is normalised first.

    Raises ValueError for anything but four finite numbers of non-zero norm."""
    arr = np.asarray(q, dtype=np.float64)
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise ValueError(f"a quaternion needs four finite numbers [w, x, y, z], got {np.asarray(q).tolist()}")
    norm = float(np.linalg.norm(arr))
    if norm < 1e-9:
        raise ValueError("a quaternion of zero norm is no rotation")
    w, x, y, z = arr / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_yaw(rot: FloatArray) -> float:
    """Heading of a rotation: the angle of its x axis projected on the ground plane (radians)."""
    return math.atan2(float(rot[1, 0]), float(rot[0, 0]))


def quaternion_yaw(q: Sequence[float] | FloatArray) -> float:
    """Heading (rotation about +z, radians) of a quaternion [w, x, y, z]."""
    return matrix_yaw(quaternion_matrix(q))


def rot_z(yaw: float) -> FloatArray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def quarter_turn(yaw: float) -> float:
    """``yaw`` rounded to the nearest multiple of 90 degrees (a sensor's nominal mounting)."""
    return round(yaw / (math.pi / 2)) * (math.pi / 2)


@dataclass(frozen=True, eq=False)
class Pose:
    """A rigid transform: ``parent = rotation @ local + translation``."""

    rotation: FloatArray
    translation: FloatArray

    @classmethod
    def from_record(cls, translation: Sequence[float], rotation: Sequence[float]) -> Pose:
        """From a nuScenes-style ``translation`` [x, y, z] and ``rotation`` [w, x, y, z]; ValueError if invalid."""
        t = np.asarray(translation, dtype=np.float64)
        if t.shape != (3,) or not np.isfinite(t).all():
            raise ValueError(f"a translation needs three finite numbers, got {np.asarray(translation).tolist()}")
        return cls(quaternion_matrix(rotation), t)

    def compose(self, child: Pose) -> Pose:
        """The child's frame in this pose's parent frame (``self`` after ``child``)."""
        return Pose(self.rotation @ child.rotation, self.rotation @ child.translation + self.translation)

    def to_local(self, points: FloatArray) -> FloatArray:
        """Parent-frame points (N, 3) in this frame."""
        return (np.asarray(points, dtype=np.float64) - self.translation) @ self.rotation

    def direction_to_local(self, vectors: FloatArray) -> FloatArray:
        """Parent-frame directions (N, 3) in this frame (rotation only)."""
        return np.asarray(vectors, dtype=np.float64) @ self.rotation

    def ground_aligned(self) -> Pose:
        """The same origin with only the heading kept (x forward along the ground, z up)."""
        return Pose(rot_z(matrix_yaw(self.rotation)), self.translation)
