"""The planner as a closed-loop driving policy (:class:`~blockpilot.sim.drive.policies.DrivePolicy`).

``sim`` may not import ``runtime``, so the adapter lives here: each planning period it turns the world's
:class:`~blockpilot.sim.drive.world.DriveObservation` into the runtime's
:class:`~blockpilot.runtime.plan_types.Observation` (the cameras rendered from the live state, the ego's driven past,
speed, acceleration and route command, as :func:`blockpilot.eval.synthetic.observation` does for a keyframe), plans,
and answers the plan's waypoints, or None when the answer did not parse (the episode counts a plan failure and the
controller keeps the last plan). Plan times are kept for the overhead figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime.plan_types import Observation
from ..sim.cameras import FRONT_CAMERA, CameraSpec
from ..sim.drive.world import DriveObservation
from ..vla.prompt import EgoState


def runtime_observation(obs: DriveObservation, cameras: Sequence[CameraSpec] = (FRONT_CAMERA,)) -> Observation:
    ego = EgoState(past_waypoints=obs.past_xy, speed_mps=float(obs.speed), accel_mps2=float(obs.accel))
    return Observation(images=list(obs.images(cameras).values()), ego=ego, route_command=obs.route_command)


class PlannerDrivePolicy:
    """A :class:`~blockpilot.runtime.planner.Planner` (anything with its ``plan(Observation)``) driving."""

    needs_images = True

    def __init__(self, planner: Any, name: str = "planner", cameras: Sequence[CameraSpec] = (FRONT_CAMERA,)) -> None:
        self.planner, self.name, self.cameras = planner, name, tuple(cameras)
        self.plan_ms: list[float] = []
        self.errors: list[str] = []

    def plan(self, observation: DriveObservation) -> np.ndarray | None:
        answer = self.planner.plan(runtime_observation(observation, self.cameras))
        stats = getattr(answer, "stats", None)
        if stats is not None:
            self.plan_ms.append(float(stats.stage_ms.get("total", 0.0)))
        if answer.waypoints is None:
            self.errors.append(str(getattr(answer, "error", "no waypoints")))
            return None
        return np.asarray(answer.waypoints, dtype=np.float64)
