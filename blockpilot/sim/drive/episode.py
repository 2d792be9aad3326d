"""One closed-loop episode: warm-up on the expert, then a policy drives; the record the metrics read.

The episode (:func:`run_episode`) starts the world at the scene's first step and replays the expert ego for
:attr:`DriveConfig.start_s` seconds (so that the ego has a past, as the open-loop keyframes do), then hands over:
every :attr:`DriveConfig.plan_period_s` the policy answers waypoints from the observation, and every world step the
controller (:class:`~.vehicle.Controller`) turns the latest plan into commands for the bicycle. It ends at
:attr:`DriveConfig.end_s`. A policy answer that is not six finite (x, y) pairs counts as a plan failure and the last
plan stays in force (before any plan: stand still).

:class:`DriveLog` is everything the metrics (``blockpilot.eval.closed_loop_metrics``) need, so that hand-built
scenes can be scored without a world.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from blockpilot.sim.path import Path
from blockpilot.sim.samples import FUTURE_TIMES_S
from blockpilot.sim.types import FloatArray, Road

from .policies import DrivePolicy
from .vehicle import Controller, ControllerGains, EgoState, VehicleLimits, bicycle_step, plan_to_world
from .world import DriveWorld

Size = tuple[float, float, float]
PLAN_TIMES_S = (0.0, *FUTURE_TIMES_S)


@dataclass(frozen=True)
class DriveConfig:
    plan_period_s: float = 0.5
    start_s: float = 2.0  # the expert drives until then
    end_s: float = 20.0
    route_grace_s: float = 2.0  # the route ends where the expert was this long before the end
    limits: VehicleLimits = field(default_factory=VehicleLimits)
    gains: ControllerGains = field(default_factory=ControllerGains)

    def __post_init__(self) -> None:
        if not (self.plan_period_s > 0 and 0 <= self.start_s < self.end_s and self.route_grace_s >= 0):
            raise ValueError(f"DriveConfig: need plan_period_s > 0 and 0 <= start_s < end_s, got {self}")


@dataclass(frozen=True, eq=False)
class DriveLog:
    """One driven episode. ``ego`` (T, 5) and ``agents`` (T, A, 5) are x, y, yaw, speed, accel every ``dt``; the
    policy drove from ``start_step`` on. Progress is measured along ``route`` (arc length): the route to complete
    runs from ``route_start_s`` for ``route_length`` metres, and the expert progressed ``expert_progress`` metres
    over the same time. ``stop_s`` is a stop line's arc length on the route, if any."""

    name: str
    policy: str
    dt: float
    ego: FloatArray
    ego_size: Size
    agents: FloatArray
    agent_kinds: tuple[str, ...]
    agent_sizes: tuple[Size, ...]
    road: Road
    route: Path
    start_step: int
    route_start_s: float
    route_length: float
    expert_progress: float
    stop_s: float | None = None
    plans: int = 0
    plan_failures: int = 0
    plan_s: float = 0.0  # wall time inside the policy (not deterministic, not scored)
    world_s: float = 0.0  # wall time of everything else: rendering, control, the world's steps


def _valid(waypoints: FloatArray | None) -> bool:
    if waypoints is None:
        return False
    arr = np.asarray(waypoints)
    return arr.shape == (len(FUTURE_TIMES_S), 2) and bool(np.isfinite(arr).all())


def run_episode(world: DriveWorld, policy: DrivePolicy, config: DriveConfig = DriveConfig()) -> DriveLog:
    """Drive ``world`` (fresh: at its first step) with ``policy`` to the end (module docstring)."""
    scene, spec, dt = world.scene, world.spec, world.dt
    k0 = round(config.start_s / dt)
    k_end = min(round(config.end_s / dt), scene.num_steps - 1)
    if k0 >= k_end:
        raise ValueError(f"episode of {scene.name}: start {config.start_s} s is not before its end ({k_end * dt} s)")
    for k in range(world.step_index, k0):
        x, y, yaw, v, a = (float(u) for u in scene.ego.states[k + 1])
        world.step(EgoState(x, y, yaw, v, a))
    kappa = float(spec.route.curvature(world.route_progress()))
    world.ego = replace(world.ego, steer=math.atan(config.limits.wheelbase * kappa))
    ctrl = Controller(config.gains, config.limits)
    ctrl.set_plan(np.repeat(world.ego.xy[None], len(PLAN_TIMES_S), axis=0), np.array(PLAN_TIMES_S), world.time_s)
    period = max(1, round(config.plan_period_s / dt))
    plans = failures = 0
    plan_s = 0.0
    started = time.perf_counter()
    for k in range(k0, k_end):
        if (k - k0) % period == 0:
            observation = world.observation()
            if getattr(policy, "needs_images", False):
                observation.images()  # rendered (and kept) here, so that it counts as the world's time
            t0 = time.perf_counter()
            answer = policy.plan(observation)
            plan_s += time.perf_counter() - t0
            plans += 1
            if _valid(answer):
                ctrl.set_plan(plan_to_world(np.asarray(answer), world.ego), np.array(PLAN_TIMES_S), world.time_s)
            else:
                failures += 1
        accel, steer = ctrl.command(world.ego, world.time_s, dt)
        world.step(bicycle_step(world.ego, accel, steer, dt, config.limits))
    arc = spec.expert_arc[:, 0]
    grace = round(config.route_grace_s / dt)
    start_s = float(spec.route.to_frenet(np.asarray(world.ego_history[k0][:2]))[0])
    return DriveLog(
        name=scene.name, policy=policy.name, dt=dt,
        ego=np.array(world.ego_history), ego_size=scene.ego_size, agents=np.stack(world.agent_history),
        agent_kinds=tuple(a.kind for a in scene.agents), agent_sizes=tuple(a.size for a in scene.agents),
        road=scene.road, route=spec.route, start_step=k0, route_start_s=start_s,
        route_length=float(arc[max(k_end - grace, k0)] - arc[k0]), expert_progress=float(arc[k_end] - arc[k0]),
        stop_s=scene.road.stop_line_s, plans=plans, plan_failures=failures, plan_s=plan_s,
        world_s=time.perf_counter() - started - plan_s,
    )
