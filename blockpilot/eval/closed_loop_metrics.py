"""NAVSIM's PDM sub-scores and score on a closed-loop episode (:class:`~blockpilot.sim.drive.episode.DriveLog`).

Source: NAVSIM (Dauner et al., "NAVSIM: Data-Driven Non-Reactive Autonomous Vehicle Simulation and Benchmarking",
NeurIPS 2024 Datasets and Benchmarks), whose definitions build on nuPlan's metrics (Caesar et al. 2021; Dauner et
al., "Parting with Misconceptions about Learning-based Vehicle Motion Planning", CoRL 2023, the PDM-Closed planner).
The score follows the NAVSIM **v1.1** devkit (``docs/metrics.md``), the version that added driving-direction
compliance to the multipliers::

    PDMS = NC * DAC * DDC * (5 * EP + 5 * TTC + 2 * C) / 12

(NAVSIM v1.0's PDMS is the same without DDC; it is reported too, as ``pdms_v1_0``. NAVSIM v2's EPDMS adds traffic
lights, lane keeping and extended comfort, which this world does not model.) NAVSIM scores a 4 s non-reactive
simulation of one plan; here every sub-score runs over the whole episode from the moment the policy took over
(``start_step``), with reactive agents, as closed-loop evaluation asks. Each function's docstring gives its rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..sim.drive.episode import DriveLog
from ..sim.drive.lanes import in_oncoming_lane, on_drivable, route_frenet
from ..sim.expert import box_corners, overlap_steps
from ..sim.types import FloatArray, Track

STOPPED_SPEED = 5e-2  # m/s, nuPlan's stopped_speed_threshold: a stopped ego is never at fault
AHEAD_DEG, BEHIND_DEG = 30.0, 150.0  # nuPlan's is_agent_ahead / is_agent_behind angle tolerances
TTC_HORIZON_S = 1.0  # NAVSIM: time-to-collision within bound, 1 s
PROGRESS_THRESHOLD_M = 5.0  # NAVSIM: below this much expert progress, EP is 1
DDC_HORIZON_S, DDC_COMPLY_M, DDC_VIOLATE_M = 1.0, 2.0, 6.0  # NAVSIM: driving-direction horizon and thresholds


@dataclass(frozen=True)
class ComfortBounds:
    """nuPlan's ``ego_is_comfortable`` bounds (nuplan-devkit ``planning/metrics/config``), as NAVSIM uses them."""

    min_lon_accel: float = -4.05  # m/s²
    max_lon_accel: float = 2.40  # m/s²
    max_abs_lat_accel: float = 4.89  # m/s²
    max_abs_yaw_rate: float = 0.95  # rad/s
    max_abs_yaw_accel: float = 1.93  # rad/s²
    max_abs_lon_jerk: float = 4.13  # m/s³
    max_abs_mag_jerk: float = 8.37  # m/s³
    savgol_window_s: float = 0.7  # nuPlan filters with Savitzky-Golay (window 15 at 20 Hz); here ~0.7 s too


@dataclass(frozen=True)
class Collision:
    step: int
    agent: int
    kind: str
    at_fault: bool
    cause: str  # nuPlan's collision types: stopped_ego, stopped_track, active_front, active_rear, active_lateral


@dataclass(frozen=True)
class PdmScores:
    nc: float
    dac: float
    ddc: float
    ep: float
    ttc: float
    comfort: float

    @property
    def pdms(self) -> float:
        return self.nc * self.dac * self.ddc * (5 * self.ep + 5 * self.ttc + 2 * self.comfort) / 12

    @property
    def pdms_v1_0(self) -> float:
        return self.nc * self.dac * (5 * self.ep + 5 * self.ttc + 2 * self.comfort) / 12

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "pdms": self.pdms, "pdms_v1_0": self.pdms_v1_0}


def _driven(log: DriveLog) -> FloatArray:
    return log.ego[log.start_step:]


def _bearing_deg(ego: FloatArray, other_xy: FloatArray) -> float:
    """Angle between the ego's heading and the direction to ``other_xy``, in degrees [0, 180]."""
    d = other_xy - ego[:2]
    rel = np.arctan2(d[1], d[0]) - ego[2]
    return float(np.degrees(abs(np.arctan2(np.sin(rel), np.cos(rel)))))


def in_multiple_lanes(log: DriveLog, ego: FloatArray) -> bool:
    """nuPlan's "ego in multiple lanes or non-drivable area": a corner of the box off its route lane or off the
    drivable area."""
    corners = box_corners(Track(ego[None, :5]), log.ego_size)[0]
    _, lateral = route_frenet(log.route, corners)
    return bool((np.abs(lateral) > log.road.lane_width / 2).any() or not on_drivable(log.road, corners).all())


def _cause(log: DriveLog, ego: FloatArray, agent: FloatArray) -> tuple[str, bool]:
    """nuPlan's collision classification and whether the ego is at fault (``no_ego_at_fault_collisions``): a
    stopped ego never is; hitting a stopped agent or hitting with the front always is; being hit from behind never
    is; a side collision is the ego's fault only when it straddles lanes or is off the drivable area."""
    if ego[3] <= STOPPED_SPEED:
        return "stopped_ego", False
    if agent[3] <= STOPPED_SPEED:
        return "stopped_track", True
    bearing = _bearing_deg(ego, agent[:2])
    if bearing <= AHEAD_DEG:
        return "active_front", True
    if bearing >= BEHIND_DEG:
        return "active_rear", False
    return "active_lateral", in_multiple_lanes(log, ego)


def collisions(log: DriveLog) -> list[Collision]:
    """Every new contact of the ego's box with an agent's box after the policy took over (a contact already under
    way at take-over is not the policy's), in step order."""
    k0, ego = log.start_step, _driven(log)
    out = []
    for a, (kind, size) in enumerate(zip(log.agent_kinds, log.agent_sizes, strict=True)):
        track = log.agents[k0:, a]
        hit = overlap_steps(Track(ego), log.ego_size, Track(track), size)
        starts = np.nonzero(hit[1:] & ~hit[:-1])[0] + 1
        for t in starts:
            cause, fault = _cause(log, ego[t], track[t])
            out.append(Collision(int(k0 + t), a, kind, fault, cause))
    return sorted(out, key=lambda c: (c.step, c.agent))


def no_at_fault_collisions(log: DriveLog) -> float:
    """NC: 0 after an at-fault collision with a vehicle, pedestrian or cyclist, 0.5 after one with a static object
    only, else 1 (NAVSIM v1; fault as :func:`_cause`)."""
    score = 1.0
    for c in collisions(log):
        if c.at_fault:
            score = min(score, 0.5 if c.kind == "static" else 0.0)
    return score


def drivable_area_compliance(log: DriveLog) -> float:
    """DAC: 1 when every corner of the ego's box stays on the drivable area at every step, else 0 (NAVSIM v1)."""
    corners = box_corners(Track(_driven(log)), log.ego_size).reshape(-1, 2)
    return float(on_drivable(log.road, corners).all())


def driving_direction_compliance(log: DriveLog) -> float:
    """DDC: the most the ego progressed within any 1 s window while in a lane of oncoming traffic: under 2 m gives 1,
    under 6 m 0.5, else 0 (NAVSIM v1.1's driving_direction_horizon and compliance/violation thresholds)."""
    ego = _driven(log)
    step = np.concatenate([[0.0], np.hypot(*np.diff(ego[:, :2], axis=0).T)])
    against = step * in_oncoming_lane(log.road, ego[:, :2], ego[:, 2])
    width = max(1, round(DDC_HORIZON_S / log.dt))
    window = np.convolve(against, np.ones(width), mode="full")[: len(against)]
    worst = float(window.max()) if window.size else 0.0
    return 1.0 if worst < DDC_COMPLY_M else 0.5 if worst < DDC_VIOLATE_M else 0.0


def route_progress(log: DriveLog) -> FloatArray:
    """Per driven step, the furthest arc length along the route reached so far while on it (within a lane width
    of it), less ``route_start_s``: progress that leaves the route does not count."""
    s, d = route_frenet(log.route, _driven(log)[:, :2])
    on = np.abs(d) <= log.road.lane_width
    reached = np.where(on, s - log.route_start_s, 0.0)
    return np.asarray(np.maximum.accumulate(np.maximum(reached, 0.0)))


def ego_progress(log: DriveLog) -> float:
    """EP: the ego's progress along the route over the expert's in the same time (the PDM-Closed reference in
    NAVSIM), clipped to [0, 1]; 1 when the expert made less than 5 m (NAVSIM's progress_distance_threshold)."""
    if log.expert_progress < PROGRESS_THRESHOLD_M:
        return 1.0
    return float(np.clip(route_progress(log)[-1] / log.expert_progress, 0.0, 1.0))


def _projected(ego: FloatArray, yaw_rate: FloatArray, tau: float) -> FloatArray:
    """The ego ``tau`` seconds on at constant speed and yaw rate (straight where the rate is ~0)."""
    out = ego.copy()
    th, v, w = ego[:, 2], ego[:, 3], yaw_rate
    turning = np.abs(w) > 1e-6
    w_safe = np.where(turning, w, 1.0)
    out[:, 0] += np.where(turning, v / w_safe * (np.sin(th + w * tau) - np.sin(th)), v * tau * np.cos(th))
    out[:, 1] += np.where(turning, v / w_safe * (np.cos(th) - np.cos(th + w * tau)), v * tau * np.sin(th))
    out[:, 2] = th + w * tau
    return out


def time_to_collision(log: DriveLog) -> float:
    """TTC: 0 when, at some step, the ego moving on at constant speed and yaw rate would touch an agent (at that
    agent's recorded position) within 1 s, with the agent ahead of the ego or stopped, or beside it while the ego
    straddles lanes now (the classification of :func:`_cause` on the current state, as NAVSIM's scorer does); agents
    already in contact are left to NC; a stopped ego is never at fault (NAVSIM v1). Else 1.

    One deviation: NAVSIM projects the ego straight ahead. On this world's curves (radius 35 m and up) a straight
    projection runs into every oncoming car that passes, so the expert itself would score TTC 0 on most winding
    roads; the projection here follows the current yaw rate (which is straight ahead on a straight road)."""
    k0, ego, dt = log.start_step, _driven(log), log.dt
    n = len(ego)
    agents = log.agents[k0:]
    yaw_rate = np.gradient(np.unwrap(ego[:, 2]), dt) if n > 1 else np.zeros(n)
    for a, size in enumerate(log.agent_sizes):
        now = overlap_steps(Track(ego), log.ego_size, Track(agents[:, a]), size)
        for k in range(1, round(TTC_HORIZON_S / dt) + 1):
            ahead = _projected(ego, yaw_rate, k * dt)
            later = agents[np.minimum(np.arange(n) + k, n - 1), a]
            hit = overlap_steps(Track(ahead), log.ego_size, Track(later), size) & ~now & (ego[:, 3] > STOPPED_SPEED)
            for t in np.nonzero(hit)[0]:
                if _cause(log, ego[t], later[t])[1]:
                    return 0.0
    return 1.0


def savgol(x: FloatArray, window: int, deriv: int, dt: float) -> FloatArray:
    """Savitzky-Golay (1964) filtering with a quadratic: the ``deriv``-th derivative (0, 1 or 2) of the least-squares
    quadratic through each ``window`` (odd) samples, at its centre; the first and last half windows are evaluated on
    the first and last full window's fit (scipy's ``mode="interp"``)."""
    half = window // 2
    t = np.arange(-half, half + 1, dtype=np.float64)
    fit = np.linalg.pinv(np.vander(t, 3, increasing=True))  # (3, window): samples -> c0, c1, c2
    coef = np.lib.stride_tricks.sliding_window_view(x, window) @ fit.T  # (n - window + 1, 3)

    def at(c: FloatArray, u: FloatArray) -> FloatArray:
        c0, c1, c2 = (c[..., k:k + 1] for k in range(3))
        value = (c0 + c1 * u + c2 * u**2, (c1 + 2 * c2 * u) / dt, 2 * c2 / dt**2 + 0 * u)[deriv]
        return np.asarray(value)

    body = at(coef, np.zeros(1))[:, 0]
    head, tail = at(coef[:1], t[:half])[0], at(coef[-1:], t[half + 1:])[0]
    return np.concatenate([head, body, tail])


def comfort_signals(log: DriveLog, bounds: ComfortBounds = ComfortBounds()) -> dict[str, FloatArray]:
    """Longitudinal and lateral acceleration, jerks, yaw rate and acceleration of the driven ego, each filtered and
    differentiated with a quadratic Savitzky-Golay filter (:func:`savgol`) as nuPlan does."""
    ego, dt = _driven(log), log.dt
    n = len(ego)
    window = min(max(3, round(bounds.savgol_window_s / dt) | 1), n if n % 2 else n - 1)
    if window < 3:
        zero = np.zeros(n)
        return {k: zero for k in ("lon_accel", "lat_accel", "yaw_rate", "yaw_accel", "lon_jerk", "mag_jerk")}
    yaw = np.unwrap(ego[:, 2])
    yaw_rate = savgol(yaw, window, 1, dt)
    lat = ego[:, 3] * yaw_rate
    lon_jerk = savgol(ego[:, 4], window, 1, dt)
    return {"lon_accel": savgol(ego[:, 4], window, 0, dt), "lat_accel": lat, "yaw_rate": yaw_rate,
            "yaw_accel": savgol(yaw, window, 2, dt), "lon_jerk": lon_jerk,
            "mag_jerk": np.hypot(lon_jerk, savgol(lat, window, 1, dt))}


def comfort(log: DriveLog, bounds: ComfortBounds = ComfortBounds()) -> float:
    """C: 1 when every signal of :func:`comfort_signals` stays within nuPlan's bounds at every step, else 0."""
    sig, b = comfort_signals(log, bounds), bounds
    ok = ((sig["lon_accel"] >= b.min_lon_accel).all() and (sig["lon_accel"] <= b.max_lon_accel).all()
          and (np.abs(sig["lat_accel"]) <= b.max_abs_lat_accel).all()
          and (np.abs(sig["yaw_rate"]) <= b.max_abs_yaw_rate).all()
          and (np.abs(sig["yaw_accel"]) <= b.max_abs_yaw_accel).all()
          and (np.abs(sig["lon_jerk"]) <= b.max_abs_lon_jerk).all()
          and (np.abs(sig["mag_jerk"]) <= b.max_abs_mag_jerk).all())
    return float(ok)


def pdm_scores(log: DriveLog) -> PdmScores:
    return PdmScores(nc=no_at_fault_collisions(log), dac=drivable_area_compliance(log),
                     ddc=driving_direction_compliance(log), ep=ego_progress(log), ttc=time_to_collision(log),
                     comfort=comfort(log))
