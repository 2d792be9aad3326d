"""Synthetic scenes as Waymo Open Dataset end-to-end driving (WOD-E2E) TFRecords of ``E2EDFrame``.

Per frame at time t0: every camera's JPEG and calibration, the ego's past states over (-4 s, 0]
and future positions over (0, 5 s] at 4 Hz in the ego frame at t0 (x forward, y left, z up), the
route command as the intent enum, and three rated futures: the expert's (score 10), a slower one
and one that drifts across the lane (lower scores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blockpilot.formats.tfrecord import write_tfrecord
from blockpilot.formats.wod import dataset_pb2 as wod
from blockpilot.formats.wod import end_to_end_driving_data_pb2 as e2e
from blockpilot.geometry import to_ego_frame
from blockpilot.sim.types import FloatArray, Scene
from blockpilot.sim.writers._common import (
    CameraLike,
    RenderFn,
    camera_axes_in_ego,
    default_render,
    render_jpeg,
    sample_track,
    scene_start_us,
    step_time_us,
    steps_at_rate,
    synthetic_name,
    yaw_rate,
)

STATE_HZ = 4.0
PAST_STATES = 16  # t = -3.75 s .. 0 s
FUTURE_STATES = 20  # t = 0.25 s .. 5 s
PAST_SPAN_S = (PAST_STATES - 1) / STATE_HZ
FUTURE_SPAN_S = FUTURE_STATES / STATE_HZ
DEFAULT_FILE = "synthetic_wod_e2e.tfrecord-00000-of-00001"

INTENTS = {
    "go straight": e2e.EgoIntent.GO_STRAIGHT,
    "turn left": e2e.EgoIntent.GO_LEFT,
    "turn right": e2e.EgoIntent.GO_RIGHT,
}
# (name, progress factor along the expert path, lateral drift reached at 5 s in metres, score)
RATED_FUTURES = (
    ("expert", 1.0, 0.0, 10.0),
    ("slower", 0.6, 0.0, 6.0),
    ("lane drift", 1.0, 1.8, 3.0),
)


def camera_enum(camera: CameraLike) -> wod.CameraName.Name:
    """The WOD ``CameraName.Name`` for a camera named e.g. ``FRONT``, ``front_left`` or ``CAM_SIDE_RIGHT``."""
    name = camera.name.upper().replace("-", "_").replace(" ", "_").removeprefix("CAM_")
    try:
        return wod.CameraName.Name.Value(name)
    except ValueError:
        raise ValueError(f"camera {camera.name!r} has no WOD CameraName (FRONT, FRONT_LEFT, ... REAR_RIGHT)") from None


def camera_calibration(camera: CameraLike) -> wod.CameraCalibration:
    extrinsic = np.eye(4)
    extrinsic[:3, :3] = camera_axes_in_ego(camera)
    extrinsic[:3, 3] = (camera.x, camera.y, camera.z)
    return wod.CameraCalibration(
        name=camera_enum(camera),
        intrinsic=[camera.fx, camera.fy, camera.cx, camera.cy, 0.0, 0.0, 0.0, 0.0, 0.0],
        extrinsic=wod.Transform(transform=[float(v) for v in extrinsic.ravel()]),
        width=camera.width,
        height=camera.height,
        rolling_shutter_direction=wod.CameraCalibration.GLOBAL_SHUTTER,
    )


def frame_steps(scene: Scene, frame_rate_hz: float) -> list[int]:
    """Steps with 4 s of history and 5 s of future inside the scene, ``frame_rate_hz`` apart."""
    first = math.ceil(PAST_SPAN_S / scene.dt - 1e-9) * scene.dt
    last = scene.duration_s - FUTURE_SPAN_S
    if last < first - 1e-9:
        return []
    steps = steps_at_rate(scene, frame_rate_hz, start_s=first, end_s=last)
    return [s for s in steps if s * scene.dt >= PAST_SPAN_S - 1e-9 and s * scene.dt <= last + 1e-9]


def _states(pos: FloatArray, vel: FloatArray | None = None, accel: FloatArray | None = None,
            score: float | None = None) -> e2e.EgoTrajectoryStates:
    out = e2e.EgoTrajectoryStates(pos_x=pos[:, 0].tolist(), pos_y=pos[:, 1].tolist(), pos_z=[0.0] * len(pos))
    if vel is not None and accel is not None:
        out.vel_x.extend(vel[:, 0].tolist())
        out.vel_y.extend(vel[:, 1].tolist())
        out.accel_x.extend(accel[:, 0].tolist())
        out.accel_y.extend(accel[:, 1].tolist())
    if score is not None:
        out.preference_score = score
    return out


def _rotate(vectors: FloatArray, angle: float) -> FloatArray:
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * vectors[:, 0] - s * vectors[:, 1], s * vectors[:, 0] + c * vectors[:, 1]], axis=1)


def ego_trajectories(scene: Scene, step: int) -> tuple[e2e.EgoTrajectoryStates, e2e.EgoTrajectoryStates,
                                                       list[e2e.EgoTrajectoryStates]]:
    """(past, future, rated futures) at ``step``, all in the ego frame at that step."""
    t0 = step * scene.dt
    origin, yaw0 = scene.ego.xy[step], float(scene.ego.yaw[step])
    past_t = t0 + (np.arange(PAST_STATES) - (PAST_STATES - 1)) / STATE_HZ
    past = sample_track(scene.ego, scene.dt, past_t)
    heading = np.stack([np.cos(past[:, 2]), np.sin(past[:, 2])], axis=1)
    normal = np.stack([-heading[:, 1], heading[:, 0]], axis=1)
    omega = np.interp(past_t, np.arange(scene.num_steps) * scene.dt, yaw_rate(scene.ego, scene.dt))
    vel_world = heading * past[:, 3:4]
    accel_world = heading * past[:, 4:5] + normal * (past[:, 3] * omega)[:, None]
    past_states = _states(to_ego_frame(past[:, :2], origin, yaw0),
                          _rotate(vel_world, -yaw0), _rotate(accel_world, -yaw0))

    future_dt = np.arange(1, FUTURE_STATES + 1) / STATE_HZ
    future = sample_track(scene.ego, scene.dt, t0 + future_dt)
    future_states = _states(to_ego_frame(future[:, :2], origin, yaw0))
    rated = []
    for _, progress, drift, score in RATED_FUTURES:
        states = sample_track(scene.ego, scene.dt, t0 + progress * future_dt)
        left = np.stack([-np.sin(states[:, 2]), np.cos(states[:, 2])], axis=1)
        xy = states[:, :2] + left * (drift * future_dt / FUTURE_SPAN_S)[:, None]
        rated.append(_states(to_ego_frame(xy, origin, yaw0), score=score))
    return past_states, future_states, rated


def e2ed_frame(scene: Scene, step: int, cameras: Sequence[CameraLike], render: RenderFn,
               ordinal: int = 0) -> e2e.E2EDFrame:
    past, future, rated = ego_trajectories(scene, step)
    context = wod.Context(
        name=f"{synthetic_name(scene)}-{step:04d}",
        camera_calibrations=[camera_calibration(c) for c in cameras],
        stats=wod.Context.Stats(time_of_day="Day", location="location_synthetic", weather="sunny"),
    )
    frame = wod.Frame(
        context=context,
        timestamp_micros=scene_start_us(ordinal) + step_time_us(scene, step),
        images=[wod.CameraImage(name=camera_enum(c), image=render_jpeg(render, scene, step, c))
                for c in cameras],
    )
    return e2e.E2EDFrame(frame=frame, past_states=past, future_states=future,
                         intent=INTENTS[scene.route_command],
                         preference_trajectories=rated)


def write_wod_e2e(scenes: Sequence[Scene], out_dir: str | Path, *, cameras: Sequence[CameraLike] | None = None,
                  render: RenderFn | None = None, frame_rate_hz: float = 1.0,
                  file_name: str = DEFAULT_FILE) -> Path:
    """Write one TFRecord of ``E2EDFrame`` for ``scenes`` into ``out_dir``; returns its path.

    Frames are taken every ``1 / frame_rate_hz`` seconds where 4 s of history and 5 s of future fit.
    ``cameras`` defaults to :data:`blockpilot.sim.cameras.WOD_CAMERAS`.
    """
    if cameras is None:
        from blockpilot.sim.cameras import WOD_CAMERAS

        cameras = WOD_CAMERAS
    names = [camera_enum(c) for c in cameras]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need distinct WOD cameras, got {[c.name for c in cameras]}")
    render_fn = render or default_render()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name
    plans = [(ordinal, scene, frame_steps(scene, frame_rate_hz)) for ordinal, scene in enumerate(scenes)]
    for _, scene, steps in plans:
        if not steps:
            raise ValueError(f"scene {scene.name} is {scene.duration_s:.2f} s long; a WOD-E2E frame needs "
                             f"{PAST_SPAN_S} s of history and {FUTURE_SPAN_S} s of future")
    write_tfrecord(path, (e2ed_frame(scene, s, cameras, render_fn, ordinal).SerializeToString(deterministic=True)
                          for ordinal, scene, steps in plans for s in steps))
    return path
