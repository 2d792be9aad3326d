"""The ego's body and its controller: a kinematic bicycle tracking the latest plan.

**Model.** A kinematic bicycle referenced at the box centre (Rajamani, *Vehicle Dynamics and Control*, 2nd ed., §2.2):
slip angle ``beta = atan(lr / L * tan(steer))``, ``x' = v cos(yaw + beta)``, ``y' = v sin(yaw + beta)``,
``yaw' = v cos(beta) tan(steer) / L``, ``v' = a``, no reversing. It is integrated in :attr:`VehicleLimits.substeps`
Euler substeps per world step (0.1 s world step, 4 substeps: 40 Hz). The actuators are limited
(:class:`VehicleLimits`): steering angle and rate, acceleration, and its rate of change (the expert driver's own jerk
limits, :class:`~blockpilot.sim.expert.DriverParams`), so an abrupt plan shows up as such in the comfort metric
without the body doing the physically impossible.

**Controller** (:class:`Controller`, run every world step, 10 Hz). The plan is the planner's answer: waypoints in the
ego frame at plan time at 2 Hz over 3 s, put in the world frame behind the plan's own origin (a polyline with a time
at every vertex).

- Lateral: pure pursuit (Coulter, CMU-RI-TR-92-01, 1992) from the rear axle to the point ``Ld`` ahead along the
  polyline, ``Ld = max(lookahead_min, lookahead_time * v)``; ``steer = atan(2 L sin(alpha) / Ld)``. A plan shorter than
  half a metre (a stop) keeps the wheel straight.
- Longitudinal: the plan's own speed profile (the polyline's arc length over time) with position feedback on the
  along-track lag, ``v_cmd = v_ref(tau) + k_pos (s_ref(tau) - s)``, tracked by a PI controller with the profile's
  acceleration as feed-forward, ``a = a_ref + kp (v_cmd - v) + ki * integral``, the integral clamped (anti-windup).
  Past the plan's 3 s (a planner that failed to answer) it holds the last waypoint: the car stops there.
- Comfort: the commanded acceleration changes by at most :attr:`ControllerGains.comfort_jerk` per second from the one
  applied now (:func:`limit_jerk`). A new plan's speed profile rarely starts at the car's own speed, and a learned
  planner's profiles differ from plan to plan, so the PI command steps at every plan (every 0.5 s) and at the
  take-over; the body alone would follow at up to 10 m/s³ when braking, over nuPlan's 4.13 m/s³ comfort bound. 2.5 m/s³
  (the body's and the expert driver's jerk_up) leaves room for the Savitzky-Golay estimate the metric reads, which
  overshoots at an episode's first samples (4.4 m/s³ there for a 3 m/s³ ramp that turns). Speeding up is capped at
  :attr:`ControllerGains.comfort_accel` (nuPlan's bound is 2.40 m/s², the body's 3): speeding up is never urgent.
  Never at safety's cost: when the plan needs more than :attr:`ControllerGains.emergency_decel` of constant braking to
  get from the current speed to its final speed within its remaining length (:func:`required_decel`; a plan that
  stops a few metres ahead, say), the command is not limited and the body's own limits apply, so an emergency stop
  stops where it did without the limit. The same controller drives every policy (expert, baselines, planner).

Gains (:class:`ControllerGains`) were set on the expert's plans in generated scenes: the tests check a straight and a
curved plan are tracked within bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from blockpilot.sim.types import FloatArray


@dataclass(frozen=True)
class VehicleLimits:
    wheelbase: float = 2.8  # m, for the generator's 4.6 m ego box
    rear_to_center: float = 1.4  # m, lr
    max_steer: float = 0.6  # rad (34 degrees)
    max_steer_rate: float = 0.8  # rad/s
    max_accel: float = 3.0  # m/s²
    max_decel: float = 8.0  # m/s², a full stop
    jerk_up: float = 2.5  # m/s³, as DriverParams.jerk_up
    jerk_down: float = 10.0  # m/s³, as DriverParams.jerk_down
    substeps: int = 4


@dataclass(frozen=True)
class ControllerGains:
    lookahead_min: float = 3.0  # m
    lookahead_time: float = 0.7  # s
    k_pos: float = 0.5  # 1/s: speed added per metre of lag behind the plan's timing
    kp: float = 1.2  # 1/s
    ki: float = 0.1  # 1/s²
    integral_limit: float = 1.5  # m/s
    min_plan_length: float = 0.5  # m: a shorter plan is a stop, steering held straight
    comfort_jerk: float | None = 2.5  # m/s³: the commanded acceleration's rate of change (None: the body's limits)
    comfort_accel: float | None = 2.0  # m/s²: the most the controller speeds up with (None: the body's max_accel)
    emergency_decel: float = 4.0  # m/s²: a plan that needs harder braking than this is not jerk-limited


@dataclass(frozen=True)
class EgoState:
    """x, y (box centre, world), yaw (rad), speed (m/s), the acceleration applied (m/s²), the steering angle (rad)."""

    x: float
    y: float
    yaw: float
    v: float
    a: float = 0.0
    steer: float = 0.0

    @property
    def xy(self) -> FloatArray:
        return np.array([self.x, self.y])

    def row(self) -> list[float]:
        """The world's recorded state: x, y, yaw, speed, accel (a :class:`~blockpilot.sim.types.Track` row)."""
        return [self.x, self.y, self.yaw, self.v, self.a]


def bicycle_step(state: EgoState, accel: float, steer: float, dt: float,
                 limits: VehicleLimits = VehicleLimits()) -> EgoState:
    """Apply the commands (limited) for ``dt`` seconds."""
    a = float(np.clip(accel, -limits.max_decel, limits.max_accel))
    a = float(np.clip(a, state.a - limits.jerk_down * dt, state.a + limits.jerk_up * dt))
    d = float(np.clip(steer, -limits.max_steer, limits.max_steer))
    d = float(np.clip(d, state.steer - limits.max_steer_rate * dt, state.steer + limits.max_steer_rate * dt))
    x, y, yaw, v = state.x, state.y, state.yaw, state.v
    h = dt / limits.substeps
    beta = math.atan(limits.rear_to_center / limits.wheelbase * math.tan(d))
    for _ in range(limits.substeps):
        v_next = max(v + a * h, 0.0)
        v_mid = 0.5 * (v + v_next)
        x += v_mid * math.cos(yaw + beta) * h
        y += v_mid * math.sin(yaw + beta) * h
        yaw += v_mid * math.cos(beta) * math.tan(d) / limits.wheelbase * h
        v = v_next
    if v <= 0.0 and a < 0:
        a = 0.0  # at rest: brakes hold, nothing is accelerating
    return EgoState(x, y, math.atan2(math.sin(yaw), math.cos(yaw)), v, a, d)


def required_decel(speed: float, end_speed: float, distance: float) -> float:
    """The constant deceleration (m/s², >= 0) that brings ``speed`` down to ``end_speed`` within ``distance`` metres."""
    if speed <= end_speed:
        return 0.0
    return (speed * speed - end_speed * end_speed) / (2 * max(distance, 1e-3))


def limit_jerk(accel: float, applied: float, dt: float, gains: ControllerGains, emergency: bool = False) -> float:
    """``accel`` at most ``gains.comfort_accel``, moved at most ``gains.comfort_jerk * dt`` from the acceleration
    ``applied`` now; in an ``emergency`` (or with ``comfort_jerk`` None) not rate-limited: the body's own limits apply
    (module docstring)."""
    if gains.comfort_accel is not None:
        accel = min(accel, gains.comfort_accel)
    if gains.comfort_jerk is None or emergency:
        return accel
    step = gains.comfort_jerk * dt
    return float(np.clip(accel, applied - step, applied + step))


def plan_to_world(waypoints: FloatArray, origin: EgoState) -> FloatArray:
    """Ego-frame waypoints (N, 2) at plan time into the world frame, with the origin prepended: (N + 1, 2)."""
    c, s = math.cos(origin.yaw), math.sin(origin.yaw)
    pts = np.asarray(waypoints, dtype=np.float64) @ np.array([[c, s], [-s, c]]) + origin.xy
    return np.vstack([origin.xy, pts])


class Controller:
    """Pure pursuit plus a speed PI controller on the latest plan (module docstring)."""

    def __init__(self, gains: ControllerGains = ControllerGains(), limits: VehicleLimits = VehicleLimits()) -> None:
        self.gains, self.limits = gains, limits
        self._xy = np.zeros((2, 2))
        self._times = np.array([0.0, 1.0])
        self._s = np.zeros(2)
        self._t0 = 0.0
        self._integral = 0.0

    def set_plan(self, world_xy: FloatArray, times_s: FloatArray, now_s: float) -> None:
        """Track ``world_xy`` (N, 2), reached at ``times_s`` (N,) after ``now_s`` (its first point at 0 s)."""
        self._xy = np.asarray(world_xy, dtype=np.float64)
        self._times = np.asarray(times_s, dtype=np.float64)
        self._s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(self._xy, axis=0).T))])
        self._t0 = now_s

    def _project(self, p: FloatArray) -> float:
        """Arc length of the nearest point of the plan's polyline to ``p``."""
        a, b = self._xy[:-1], self._xy[1:]
        d = b - a
        u = np.clip(np.einsum("ij,ij->i", p - a, d) / np.maximum(np.einsum("ij,ij->i", d, d), 1e-12), 0.0, 1.0)
        dist = np.hypot(*(a + u[:, None] * d - p).T)
        k = int(np.argmin(dist))
        return float(self._s[k] + u[k] * (self._s[k + 1] - self._s[k]))

    def _point_at(self, s: float) -> FloatArray:
        """The polyline's point at arc length ``s``, continued straight past its end."""
        if s <= self._s[-1]:
            return np.array([np.interp(s, self._s, self._xy[:, 0]), np.interp(s, self._s, self._xy[:, 1])])
        k = int(np.nonzero(np.diff(self._s) > 1e-6)[0][-1])
        direction = (self._xy[k + 1] - self._xy[k]) / (self._s[k + 1] - self._s[k])
        return np.asarray(self._xy[-1] + direction * (s - self._s[-1]))

    def _profile(self, tau: float) -> tuple[float, float, float]:
        """(s_ref, v_ref, a_ref) of the plan at ``tau`` seconds after it was made."""
        g = self._times
        s_ref = float(np.interp(tau, g, self._s))
        if tau >= g[-1]:
            return s_ref, 0.0, 0.0
        # Segment speeds at the segment midpoints, extended linearly back to the plan's start.
        mids, speeds = 0.5 * (g[:-1] + g[1:]), np.diff(self._s) / np.diff(g)
        if len(speeds) > 1:
            v0 = speeds[0] - (speeds[1] - speeds[0]) * (mids[0] - g[0]) / (mids[1] - mids[0])
            mids, speeds = np.concatenate([[g[0]], mids]), np.concatenate([[max(v0, 0.0)], speeds])
        v_ref = float(np.interp(tau, mids, speeds))
        a_ref = (float(np.interp(tau + 0.05, mids, speeds)) - v_ref) / 0.05
        return s_ref, v_ref, a_ref

    def command(self, state: EgoState, now_s: float, dt: float) -> tuple[float, float]:
        """(acceleration, steering angle) for the next ``dt`` seconds."""
        g, lim = self.gains, self.limits
        s_now = self._project(state.xy)
        s_ref, v_ref, a_ref = self._profile(now_s - self._t0)
        v_cmd = max(0.0, v_ref + g.k_pos * (s_ref - s_now))
        if s_ref - s_now < 0.05 and v_ref == 0.0:
            v_cmd = 0.0
        err = v_cmd - state.v
        self._integral = float(np.clip(self._integral + err * dt, -g.integral_limit, g.integral_limit))
        tau = now_s - self._t0
        end_speed = 0.0 if tau >= self._times[-1] else float(np.diff(self._s)[-1] / np.diff(self._times)[-1])
        emergency = required_decel(state.v, end_speed, self._s[-1] - s_now) > g.emergency_decel
        accel = limit_jerk(a_ref + g.kp * err + g.ki * self._integral, state.a, dt, g, emergency)
        if self._s[-1] < g.min_plan_length:
            return accel, 0.0
        rear = state.xy - lim.rear_to_center * np.array([math.cos(state.yaw), math.sin(state.yaw)])
        lookahead = max(g.lookahead_min, g.lookahead_time * state.v)
        target = self._point_at(s_now + lookahead)
        rel = target - rear
        dist = max(float(np.hypot(*rel)), 1e-3)
        alpha = math.atan2(rel[1], rel[0]) - state.yaw
        return accel, math.atan2(2 * lim.wheelbase * math.sin(alpha), dist)

