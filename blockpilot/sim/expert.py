"""The expert driver: path-arc-length tracking with IDM longitudinal control.

Each vehicle follows its lane path exactly (lateral control is arc-length tracking) and chooses an
acceleration from the Intelligent Driver Model: a desired speed from the speed limit and a
curvature cap previewed along the path (with a comfortable braking envelope), and virtual obstacles
for the vehicle ahead, a stop line (stop, wait, go) and pedestrian crossings with someone on them.
Jerk is limited so that the motion is smooth and therefore predictable from its past.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from blockpilot.sim.path import Path
from blockpilot.sim.types import FloatArray, Track

Size = tuple[float, float, float]  # box length, width, height


@dataclass(frozen=True)
class DriverParams:
    max_accel: float = 1.5  # m/s², IDM a
    comfort_decel: float = 2.0  # m/s², IDM b
    max_decel: float = 6.0  # hard limit; more than this is out of reach, so such obstacles are ignored
    headway_s: float = 1.4
    min_gap: float = 2.5  # bumper to bumper at standstill
    lateral_accel: float = 2.0  # curvature speed cap: v² |κ| <= this
    plan_decel: float = 1.0  # braking envelope ahead of lower caps
    preview_s: float = 1.2  # the desired speed is read this far ahead along the path
    jerk_up: float = 2.5
    jerk_down: float = 10.0
    stop_wait_s: float = 1.0
    stop_margin: float = 1.0  # front bumper this far before a stop line when stopped
    stop_speed: float = 0.3  # below this (m/s) near the line counts as stopped


@dataclass(frozen=True, eq=False)
class Crossing:
    """A pedestrian crossing as one vehicle sees it; ``across`` is a unit vector across the road."""

    s: float  # crossing centre along the vehicle's path
    depth: float  # extent along the road
    center: FloatArray
    across: FloatArray
    half_length: float  # half the road width it spans
    lane_u: float  # the vehicle's lane centre, measured along ``across`` from ``center``
    lane_half: float
    pedestrians: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class VehiclePlan:
    """What one simulated vehicle knows: its path, start state, caps, and what may stop it.
    ``leader`` indexes an earlier plan on the same path; ``desire_scale`` (T,) scales the desired
    speed over time (a lead car that slows for no visible reason)."""

    path: Path
    s_init: float
    v_init: float
    length: float
    speed_cap: FloatArray  # per path sample, from :func:`speed_envelope`
    stop_s: float | None = None
    crossings: tuple[Crossing, ...] = ()
    leader: int | None = None
    desire_scale: FloatArray | None = None
    params: DriverParams = field(default_factory=DriverParams)


def limit_at(limits: Sequence[tuple[float, float]], s: FloatArray) -> FloatArray:
    """Piecewise-constant speed limit at arc lengths ``s`` from (start s, limit) pairs."""
    starts = np.array([a for a, _ in limits])
    values = np.array([b for _, b in limits])
    idx = np.clip(np.searchsorted(starts, s, side="right") - 1, 0, len(values) - 1)
    return values[idx]


def speed_envelope(path: Path, limits: Sequence[tuple[float, float]], cruise: float,
                   params: DriverParams) -> FloatArray:
    """Allowed speed per path sample: min(cruise * limit, curvature cap), lowered ahead of every
    drop so that braking at ``plan_decel`` reaches it: env²(s) = min_{s'>=s} cap²(s') + 2b(s'-s)."""
    curve_cap = np.sqrt(params.lateral_accel / np.maximum(np.abs(path.kappa), 1e-4))
    cap = np.minimum(cruise * limit_at(limits, path.s), curve_cap)
    reach = cap**2 + 2 * params.plan_decel * path.s
    best = np.minimum.accumulate(reach[::-1])[::-1]
    return np.sqrt(np.maximum(best - 2 * params.plan_decel * path.s, 0.0))


def _idm(v: float, v0: float, obstacles: list[tuple[float, float]], p: DriverParams) -> float:
    # Above the desired speed, slow down comfortably rather than as hard as the quartic term says.
    free = max(1.0 - (v / max(v0, 0.1)) ** 4, -p.comfort_decel / p.max_accel)
    worst = 0.0
    for gap, v_other in obstacles:
        brake_term = v * (v - v_other) / (2 * np.sqrt(p.max_accel * p.comfort_decel))
        s_star = p.min_gap + max(0.0, v * p.headway_s + brake_term)
        worst = max(worst, (s_star / max(gap, 0.05)) ** 2)
    return p.max_accel * (free - worst)


def _blocked(c: Crossing, pos: FloatArray, vel: FloatArray) -> bool:
    """Someone on (or stepping onto) the crossing who has not yet cleared this vehicle's lane."""
    along = np.array([-c.across[1], c.across[0]])
    for p, w in zip(pos, vel, strict=True):
        rel = p - c.center
        if abs(float(rel @ along)) > c.depth / 2 + 1.5:
            continue
        u, vu = float(rel @ c.across), float(w @ c.across)
        if abs(vu) > 0.2:
            sign = 1.0 if vu > 0 else -1.0
            if -(c.half_length + 2.5) <= sign * u <= sign * c.lane_u + c.lane_half + 0.8:
                return True
        elif abs(u - c.lane_u) <= c.lane_half + 0.5:
            return True
    return False


class Traffic:
    """Every vehicle's IDM state, advanced one step at a time: :func:`simulate` runs it over a whole scene (open
    loop) and the closed-loop world (:mod:`blockpilot.sim.drive.world`) steps it live, adding the ego as an
    obstacle to the vehicles that have it ahead in their lane."""

    def __init__(self, plans: Sequence[VehiclePlan], dt: float) -> None:
        self.plans, self.dt = tuple(plans), dt
        n = len(self.plans)
        self.s = np.array([p.s_init for p in self.plans], dtype=np.float64)
        self.v = np.array([p.v_init for p in self.plans], dtype=np.float64)
        self.a_prev = np.zeros(n)
        self.waited = np.zeros(n)
        self.stop_done = [p.stop_s is None for p in self.plans]

    def step(self, t: int, ped_xy: FloatArray | None = None, ped_vel: FloatArray | None = None,
             extra: Sequence[Sequence[tuple[float, float]]] | None = None) -> FloatArray:
        """Advance one step from step index ``t`` (for ``desire_scale``); pedestrians are positions and velocities
        (P, 2) now; ``extra`` holds more (gap, speed) obstacles per vehicle. Returns (vehicles, 3): the arc
        length and speed before the step and the acceleration applied."""
        plans, dt, s, v = self.plans, self.dt, self.s, self.v
        n = len(plans)
        acc = np.zeros(n)
        for i, p in enumerate(plans):
            prm = p.params
            front = s[i] + p.length / 2
            obstacles: list[tuple[float, float]] = list(extra[i]) if extra is not None else []
            if p.leader is not None:
                lead = plans[p.leader]
                obstacles.append((s[p.leader] - lead.length / 2 - front, v[p.leader]))
            if not self.stop_done[i] and p.stop_s is not None:
                to_line = p.stop_s - prm.stop_margin - front
                if v[i] < prm.stop_speed and to_line < 1.5:
                    self.waited[i] += dt
                self.stop_done[i] = self.waited[i] >= prm.stop_wait_s or to_line < -prm.stop_margin
                if not self.stop_done[i]:
                    obstacles.append((to_line + prm.min_gap, 0.0))
            for c in p.crossings:
                # Stop short of the crossing; once past that point only a crawl can still stop.
                to_stop = c.s - c.depth / 2 - 1.0 - front
                if ped_xy is None or ped_vel is None or front > c.s + c.depth / 2 or not c.pedestrians:
                    continue
                idx = list(c.pedestrians)
                can_stop = v[i] ** 2 / (2 * max(to_stop, 0.1)) <= prm.max_decel
                if can_stop and _blocked(c, ped_xy[idx], ped_vel[idx]):
                    obstacles.append((max(to_stop, 0.0) + prm.min_gap, 0.0))
            v0 = float(np.interp(s[i] + v[i] * prm.preview_s, p.path.s, p.speed_cap))
            if p.desire_scale is not None:
                v0 *= float(p.desire_scale[min(t, len(p.desire_scale) - 1)])
            a = float(np.clip(_idm(v[i], v0, obstacles, prm), -prm.max_decel, prm.max_accel))
            a = float(np.clip(a, self.a_prev[i] - prm.jerk_down * dt, self.a_prev[i] + prm.jerk_up * dt))
            if v[i] <= 1e-9 and a < 0:
                a = 0.0
            acc[i] = a
        v_next = v + acc * dt
        stopped = v_next < 0
        acc[stopped] = -v[stopped] / dt
        v_next[stopped] = 0.0
        out = np.column_stack([s, v, acc])
        self.s = s + 0.5 * (v + v_next) * dt
        self.v, self.a_prev = v_next, acc
        return out


def simulate(plans: Sequence[VehiclePlan], n_steps: int, dt: float, ped_xy: FloatArray | None = None,
             ped_vel: FloatArray | None = None) -> FloatArray:
    """Run every vehicle together; returns (vehicles, n_steps, 3): arc length, speed, accel.
    Pedestrians are given as positions and velocities (P, n_steps, 2); they do not react."""
    traffic = Traffic(plans, dt)
    out = np.zeros((len(plans), n_steps, 3))
    for t in range(n_steps):
        now = (None, None) if ped_xy is None or ped_vel is None else (ped_xy[:, t], ped_vel[:, t])
        out[:, t] = traffic.step(t, *now)
    return out


def gap_to_crossing(path: Path, center: FloatArray, half_length: float, front_s: FloatArray | float,
                    depth: float) -> FloatArray | None:
    """Metres from a front bumper at arc length ``front_s`` on ``path`` to the stopping point before the crossing
    at ``center``; None when the crossing does not span the path."""
    s_cw, lateral = path.to_frenet(center)
    if abs(lateral) > half_length + 2.0:
        return None
    return np.asarray(s_cw - depth / 2 - 1.0 - np.asarray(front_s, dtype=np.float64))


def walk_speed(elapsed: npt.ArrayLike, speed: float) -> FloatArray:
    """A walker's speed ``elapsed`` seconds after stepping out: up to ``speed`` over half a second."""
    return np.asarray(speed * np.clip(np.asarray(elapsed, dtype=np.float64) / 0.5, 0.0, 1.0))


@dataclass(frozen=True, eq=False)
class Walker:
    """A pedestrian who crosses the road: from ``start`` along the unit ``direction`` for ``distance`` metres at
    ``speed`` (:func:`walk_speed`), not before ``wanted_s`` and only once every vehicle could stop for them
    (:func:`safe_to_step_out`); ``center``/``half_length`` locate the crossing."""

    start: FloatArray
    direction: FloatArray
    distance: float
    speed: float
    wanted_s: float
    center: FloatArray
    half_length: float


def safe_to_step_out(gap: FloatArray | float, v: FloatArray | float, length: float,
                     depth: float) -> npt.NDArray[np.bool_]:
    """Whether a vehicle ``gap`` metres (front bumper to the stopping point before a crossing ``depth`` deep) away
    at speed ``v`` could brake comfortably for someone stepping out now, or has already gone by it."""
    gap_a, v_a = np.asarray(gap, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return np.asarray((gap_a >= v_a**2 / 4.0 + 3.0) | (gap_a < -(depth + length + 1.0)))


def track_on_path(path: Path, arc: FloatArray) -> Track:
    """A Track from (T, 3) arc length, speed, accel along ``path``; yaw wrapped to (-pi, pi]."""
    xy, yaw = path.pose(arc[:, 0])
    yaw = np.arctan2(np.sin(yaw), np.cos(yaw))
    return Track(np.column_stack([xy, yaw, arc[:, 1], arc[:, 2]]))


def box_corners(track: Track, size: Size) -> FloatArray:
    c, s = np.cos(track.yaw), np.sin(track.yaw)
    fwd = np.stack([c, s], axis=1) * size[0] / 2
    left = np.stack([-s, c], axis=1) * size[1] / 2
    xy = track.xy
    return np.stack([xy + fwd + left, xy + fwd - left, xy - fwd - left, xy - fwd + left], axis=1)


def overlap_steps(a: Track, size_a: Size, b: Track, size_b: Size) -> npt.NDArray[np.bool_]:
    """Boolean (T,) where the two footprints (oriented rectangles) overlap, by separating axes."""
    ca, cb = box_corners(a, size_a), box_corners(b, size_b)
    axes = np.concatenate([ca[:, 1:3] - ca[:, 0:2], cb[:, 1:3] - cb[:, 0:2]], axis=1)  # (T, 4, 2)
    pa = np.einsum("tkd,tad->tak", ca, axes)
    pb = np.einsum("tkd,tad->tak", cb, axes)
    apart = (pa.max(axis=2) < pb.min(axis=2)) | (pb.max(axis=2) < pa.min(axis=2))
    return ~apart.any(axis=1)
