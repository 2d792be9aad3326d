"""Keyframes: what a planner sees at one instant of a scene, and the future it should predict.

Everything in a :class:`Keyframe` is in the ego frame at that instant (x forward, y left, metres):
the past positions (oldest first), the ground-truth future at 2 Hz over 3 s and at 4 Hz over 5 s.
Times that fall between simulation steps are interpolated linearly; times past the end of the
scene hold the last pose and clear the matching validity flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from blockpilot.geometry import constant_velocity, to_ego_frame
from blockpilot.sim.cameras import FRONT_CAMERA, CameraSpec
from blockpilot.sim.types import FloatArray, Scene

PAST_TIMES_S = (-2.0, -1.5, -1.0, -0.5)
FUTURE_TIMES_S = tuple(0.5 * (i + 1) for i in range(6))  # 2 Hz over 3 s
FUTURE_TIMES_5S = tuple(0.25 * (i + 1) for i in range(20))  # 4 Hz over 5 s


@dataclass(eq=False)
class Keyframe:
    """One planner input and its ground truth; ``scene`` is kept for rendering the cameras."""

    scene_name: str
    step: int
    time_s: float
    past_xy: FloatArray  # (4, 2) at PAST_TIMES_S, oldest first
    speed: float  # m/s
    accel: float  # m/s², along the heading
    route_command: str
    future_xy: FloatArray  # (6, 2) at FUTURE_TIMES_S
    future_xy_5s: FloatArray  # (20, 2) at FUTURE_TIMES_5S
    future_valid: bool  # the scene lasts the 3 s horizon
    future_valid_5s: bool  # the scene lasts the 5 s horizon
    scene: Scene = field(repr=False)

    def images(self, cameras: Sequence[CameraSpec] = (FRONT_CAMERA,)) -> dict[str, npt.NDArray[np.uint8]]:
        """Rendered camera images at this keyframe, by camera name (the front camera by default)."""
        from blockpilot.sim.render import render_camera

        return {cam.name: render_camera(self.scene, self.step, cam) for cam in cameras}


def positions_at(scene: Scene, times_s: FloatArray) -> FloatArray:
    """Ego world positions (N, 2) at arbitrary times, linear between steps, held past either end."""
    grid = np.arange(scene.num_steps) * scene.dt
    xy = scene.ego.xy
    return np.stack([np.interp(times_s, grid, xy[:, 0]), np.interp(times_s, grid, xy[:, 1])], axis=1)


def route_command_at(scene: Scene, step: int) -> str:
    """The scene's turn command until the ego has come out of the turn, then "go straight"."""
    end = scene.meta.get("turn_end_step", -1)
    if scene.route_command != "go straight" and isinstance(end, int) and 0 <= end <= step:
        return "go straight"
    return scene.route_command


def keyframe_at(scene: Scene, step: int) -> Keyframe:
    t = step * scene.dt
    origin, yaw = scene.ego.xy[step], float(scene.ego.yaw[step])

    def ego_points(offsets: Sequence[float]) -> FloatArray:
        return to_ego_frame(positions_at(scene, t + np.asarray(offsets)), origin, yaw)

    end = scene.duration_s + 1e-6
    return Keyframe(
        scene_name=scene.name,
        step=step,
        time_s=t,
        past_xy=ego_points(PAST_TIMES_S),
        speed=float(scene.ego.speed[step]),
        accel=float(scene.ego.accel[step]),
        route_command=route_command_at(scene, step),
        future_xy=ego_points(FUTURE_TIMES_S),
        future_xy_5s=ego_points(FUTURE_TIMES_5S),
        future_valid=t + FUTURE_TIMES_S[-1] <= end,
        future_valid_5s=t + FUTURE_TIMES_5S[-1] <= end,
        scene=scene,
    )


def keyframes(scene: Scene, rate_hz: float = 2.0) -> list[Keyframe]:
    """Keyframes every 1/rate_hz seconds from the first instant with a full past to the end."""
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    first = -PAST_TIMES_S[0]
    times = np.arange(first, scene.duration_s + 1e-6, 1.0 / rate_hz)
    steps = sorted({round(float(t) / scene.dt) for t in times})
    return [keyframe_at(scene, s) for s in steps if s < scene.num_steps]


def keyframe_constant_velocity(keyframe: Keyframe, times_s: Sequence[float] = FUTURE_TIMES_S) -> FloatArray:
    """The constant-velocity baseline of a keyframe (:func:`blockpilot.geometry.constant_velocity` at its speed);
    (N, 2) in the ego frame."""
    return constant_velocity(keyframe.speed, times_s)
