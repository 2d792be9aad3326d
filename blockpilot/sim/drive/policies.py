"""Driving policies for the closed loop: an observation in, waypoints out (the driving schema's answer).

A :class:`DrivePolicy` answers (6, 2) waypoints in the ego frame at 2 Hz over 3 s
(:data:`~blockpilot.sim.samples.FUTURE_TIMES_S`), or None when it has no answer (the controller keeps the last plan).
Two baselines live here; the planner's adapter lives in ``blockpilot.eval`` (``sim`` may not import ``runtime``):

- :class:`ExpertPolicy`, the upper bound: the scene's own ego driver (its lane path and the IDM that generated the
  scene), re-planned every period from the live state like nuPlan's PDM-Closed: a 3 s IDM rollout along the route
  from where the ego is now, with the lead vehicle predicted at constant velocity and the walkers where they are
  heading. It is privileged (it reads the world), which an upper bound may be.
- :class:`ConstantVelocityPolicy`: straight ahead at the current speed (the usual floor).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Protocol

import numpy as np

from blockpilot.geometry import constant_velocity, to_ego_frame
from blockpilot.sim.expert import Traffic
from blockpilot.sim.samples import FUTURE_TIMES_S
from blockpilot.sim.types import FloatArray

from .world import DriveObservation, DriveWorld


class DrivePolicy(Protocol):
    name: str

    def plan(self, observation: DriveObservation) -> FloatArray | None:
        """(6, 2) ego-frame waypoints at 2 Hz over 3 s, or None."""
        ...


class ConstantVelocityPolicy:
    name = "constant-velocity"

    def plan(self, observation: DriveObservation) -> FloatArray | None:
        return constant_velocity(observation.speed, FUTURE_TIMES_S)


class ExpertPolicy:
    """The scene's IDM driver re-planned from the live state (module docstring)."""

    name = "expert"

    def __init__(self, world: DriveWorld, period_s: float = 0.5) -> None:
        self.world = world
        spec = world.spec
        # The lead is given to the rollout as a predicted obstacle, not by index.
        # CARLA's stop test wants the car below 0.1 m/s: the expert waits at the line from 0.05 m/s, not 0.3.
        params = replace(spec.ego_plan.params, stop_speed=0.05)
        self._memory = Traffic([replace(spec.ego_plan, leader=None, desire_scale=None, params=params)], world.dt)
        self._leads = [i for i, p in enumerate(spec.vehicle_plans) if p.path is spec.route]
        self._period = max(1, round(period_s / world.dt))

    def plan(self, observation: DriveObservation) -> FloatArray | None:
        w = self.world
        mem, plan = self._memory, self._memory.plans[0]
        mem.s[0], mem.v[0], mem.a_prev[0] = w.route_progress(), w.ego.v, w.ego.a
        pos, vel = w.walkers_now()
        rollout = copy.deepcopy(mem)
        times = np.round(np.asarray(FUTURE_TIMES_S) / w.dt).astype(int)
        arcs = []
        for k in range(1, int(times[-1]) + 1):
            tau = (k - 1) * w.dt
            front = rollout.s[0] + plan.length / 2
            extra = []
            for j in self._leads:
                lead, s_lead, v_lead = w.spec.vehicle_plans[j], w.traffic.s[j], w.traffic.v[j]
                if s_lead > mem.s[0]:
                    extra.append((s_lead + v_lead * tau - lead.length / 2 - front, float(v_lead)))
            rollout.step(0, pos + vel * tau, vel, [extra])
            if k == self._period:
                self._memory = copy.deepcopy(rollout)  # the stop-line bookkeeping carries on from here
            arcs.append(float(rollout.s[0]))
        xy = w.spec.route.pose(np.array([arcs[t - 1] for t in times]))[0]
        return to_ego_frame(xy, w.ego.xy, w.ego.yaw)
