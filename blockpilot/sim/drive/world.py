"""The closed-loop world: a generated scene's layout with the ego driven by a policy and agents that react to it.

:class:`DriveWorld` holds the live state at the scene's ``dt`` (0.1 s): the ego (a kinematic bicycle,
:mod:`.vehicle`), every vehicle and cyclist on its lane path under the expert's IDM
(:class:`~blockpilot.sim.expert.Traffic`: the same code that generated the open-loop scene), with the ego added as an
obstacle for a vehicle that has it ahead in its lane, and pedestrians (:class:`~blockpilot.sim.expert.Walker`) who step
onto the crossing once their time has come and every vehicle, the ego included, could still stop for them
(:func:`~blockpilot.sim.expert.safe_to_step_out`, the generator's rule), then walk across. Vehicles yield to people on
a crossing as in the open loop. Everything is numpy arithmetic in a fixed order: the same seed, policy and config
give the same trajectory, bytes equal.

The observation for the planner (:class:`DriveObservation`) is rendered from the live state by
:func:`~blockpilot.sim.render.render_state` on the scene's own ground map; the ego's past at 2 Hz comes from the driven
history, and the route command is the scene's until the ego has driven out of its turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from blockpilot.geometry import to_ego_frame
from blockpilot.sim.cameras import FRONT_CAMERA, CameraSpec
from blockpilot.sim.expert import Traffic, gap_to_crossing, safe_to_step_out, walk_speed
from blockpilot.sim.generator import WorldSpec, generate_world
from blockpilot.sim.render import render_state
from blockpilot.sim.samples import PAST_TIMES_S
from blockpilot.sim.types import FloatArray, Scene

from .vehicle import EgoState

Image = npt.NDArray[np.uint8]


@dataclass(frozen=True, eq=False)
class DriveObservation:
    """What a policy sees each planning period: the ego's past (4, 2) at :data:`~blockpilot.sim.samples.PAST_TIMES_S`
    in its current frame, its speed and acceleration, the route command, and the cameras (rendered on demand)."""

    time_s: float
    past_xy: FloatArray
    speed: float
    accel: float
    route_command: str
    render: Callable[[Sequence[CameraSpec]], dict[str, Image]] = field(repr=False)
    _rendered: dict[tuple[CameraSpec, ...], dict[str, Image]] = field(default_factory=dict, repr=False)

    def images(self, cameras: Sequence[CameraSpec] = (FRONT_CAMERA,)) -> dict[str, Image]:
        """The cameras' views of the live state, by camera name (rendered once per set of cameras)."""
        key = tuple(cameras)
        if key not in self._rendered:
            self._rendered[key] = self.render(key)
        return self._rendered[key]


class DriveWorld:
    """The live world of one generated scene (module docstring); :meth:`step` advances it by ``scene.dt``."""

    def __init__(self, scene: Scene, spec: WorldSpec) -> None:
        self.scene, self.spec = scene, spec
        self.dt = scene.dt
        self.step_index = 0
        first = scene.ego.states[0]
        self.ego = EgoState(*(float(v) for v in first[:5]))
        self.traffic = Traffic(spec.vehicle_plans, self.dt)
        n_walk = len(spec.walkers)
        self.walk_t0 = np.full(n_walk, math.inf)
        self.walk_dist = np.zeros(n_walk)
        self.walk_speed = np.zeros(n_walk)
        self.ego_history: list[list[float]] = [self.ego.row()]
        self.agent_history: list[FloatArray] = [self.agent_states()]

    @classmethod
    def from_seed(cls, seed: int, duration_s: float = 20.0) -> DriveWorld:
        return cls(*generate_world(seed, duration_s))

    @property
    def time_s(self) -> float:
        return self.step_index * self.dt

    # -- state -------------------------------------------------------------------------------------------------
    def walkers_now(self) -> tuple[FloatArray, FloatArray]:
        """Positions and velocities (P, 2) of the walkers."""
        walkers = self.spec.walkers
        if not walkers:
            return np.zeros((0, 2)), np.zeros((0, 2))
        direction = np.array([w.direction for w in walkers])
        start = np.array([w.start for w in walkers])
        moving = self.walk_dist < np.array([w.distance for w in walkers])
        return start + self.walk_dist[:, None] * direction, direction * (self.walk_speed * moving)[:, None]

    def agent_states(self) -> FloatArray:
        """(A, 5) x, y, yaw, speed, accel of the scene's agents, in its order (vehicles, then pedestrians)."""
        rows = []
        tr = self.traffic
        for i, plan in enumerate(self.spec.vehicle_plans):
            xy, yaw = plan.path.pose(tr.s[i])
            rows.append([xy[0], xy[1], math.atan2(math.sin(yaw), math.cos(yaw)), tr.v[i], tr.a_prev[i]])
        pos, vel = self.walkers_now()
        for k, w in enumerate(self.spec.walkers):
            speed = float(np.hypot(*vel[k]))
            rows.append([pos[k, 0], pos[k, 1], math.atan2(w.direction[1], w.direction[0]), speed, 0.0])
        return np.array(rows, dtype=np.float64).reshape(len(rows), 5)

    def route_progress(self) -> float:
        """The ego's arc length along its route."""
        return self.spec.route.to_frenet(self.ego.xy)[0]

    def route_command(self) -> str:
        """The scene's command until the ego has driven out of its turn, then "go straight"."""
        end = self.scene.meta.get("turn_end_s")
        if isinstance(end, float) and self.route_progress() >= end:
            return "go straight"
        return self.scene.route_command

    # -- the ego as others see it ------------------------------------------------------------------------------
    def _ego_obstacles(self) -> list[list[tuple[float, float]]]:
        """Per vehicle, the ego as an obstacle when its box overlaps the vehicle's lane ahead of it: the gap to the
        ego's rear and the ego's speed along the lane (never negative)."""
        ego, w = self.ego, self.scene.road.lane_width
        length, width = self.scene.ego_size[0], self.scene.ego_size[1]
        out: list[list[tuple[float, float]]] = []
        for i, plan in enumerate(self.spec.vehicle_plans):
            front = self.traffic.s[i] + plan.length / 2
            s_e, d_e = plan.path.to_frenet(ego.xy)
            if abs(d_e) > w / 2 + width / 2 or s_e <= self.traffic.s[i] or s_e - front > 150.0:
                out.append([])
                continue
            lane_yaw = float(plan.path.pose(s_e)[1])
            along = math.cos(ego.yaw - lane_yaw)
            reach = length / 2 * abs(along) + width / 2 * math.sqrt(max(0.0, 1 - along * along))
            out.append([(s_e - reach - front, max(0.0, ego.v * along))])
        return out

    def _step_walkers(self) -> None:
        """Walkers whose time has come step out once every vehicle (the ego included) could stop for them."""
        t, depth = self.time_s, self.spec.crosswalk_depth
        for k, w in enumerate(self.spec.walkers):
            if math.isinf(self.walk_t0[k]) and t >= w.wanted_s:
                safe = True
                for i, plan in enumerate(self.spec.vehicle_plans):
                    gap = gap_to_crossing(plan.path, w.center, w.half_length, self.traffic.s[i] + plan.length / 2,
                                          depth)
                    safe &= gap is None or bool(safe_to_step_out(gap, self.traffic.v[i], plan.length, depth))
                length = self.scene.ego_size[0]
                gap = gap_to_crossing(self.spec.route, w.center, w.half_length, self.route_progress() + length / 2,
                                      depth)
                safe &= gap is None or bool(safe_to_step_out(gap, self.ego.v, length, depth))
                if safe:
                    self.walk_t0[k] = t
            speed = float(walk_speed(t + self.dt - self.walk_t0[k], w.speed))
            self.walk_dist[k] = min(self.walk_dist[k] + 0.5 * (self.walk_speed[k] + speed) * self.dt, w.distance)
            self.walk_speed[k] = speed

    def step(self, ego_next: EgoState) -> None:
        """Advance one ``dt``: the agents react to the current state, the ego moves to ``ego_next`` (the bicycle's
        result, or the expert's recorded state during the warm-up)."""
        pos, vel = self.walkers_now()
        self.traffic.step(self.step_index, pos, vel, self._ego_obstacles())
        self._step_walkers()
        self.ego = ego_next
        self.step_index += 1
        self.ego_history.append(self.ego.row())
        self.agent_history.append(self.agent_states())

    # -- observation -------------------------------------------------------------------------------------------
    def render(self, cameras: Sequence[CameraSpec]) -> dict[str, Image]:
        pose, agents = np.array(self.ego.row()[:3]), self.agent_states()
        return {cam.name: render_state(self.scene, pose, agents, cam) for cam in cameras}

    def observation(self) -> DriveObservation:
        """The planner's input now; the past is read from the driven history (held at its start)."""
        hist = np.array(self.ego_history)[:, :2]
        idx = [max(0, self.step_index + round(t / self.dt)) for t in PAST_TIMES_S]
        past = to_ego_frame(hist[idx], self.ego.xy, self.ego.yaw)
        return DriveObservation(self.time_s, past, self.ego.v, self.ego.a, self.route_command(), self.render)
