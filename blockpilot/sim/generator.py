"""Seeded scene generation: road geometry, an intersection or a winding road, and the road users.

A scene is one of two layouts: a winding two-lane road, or a road that reaches a four-way junction
where the route command says turn left, turn right or go straight (turns start a few seconds in).
Either may have a lead vehicle or cyclist (IDM car-following, sometimes slowing down), oncoming
traffic, a pedestrian crossing with people walking over it (everyone yields), a stop line (stop,
wait, go) and a speed-limit change. Everything comes from ``numpy.random.default_rng(seed)``, so
the same seed gives the same arrays, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from blockpilot.sim.expert import (
    Crossing,
    DriverParams,
    VehiclePlan,
    Walker,
    gap_to_crossing,
    safe_to_step_out,
    simulate,
    speed_envelope,
    track_on_path,
    walk_speed,
)
from blockpilot.sim.path import Path, Segment
from blockpilot.sim.types import Agent, FloatArray, Road, Scene, Track

SPEED_LIMITS = (8.33, 11.11, 13.89, 16.67)  # 30, 40, 50, 60 km/h
LEAD_IN = 60.0  # road behind the ego's start, for the past and the rear cameras
EGO_SIZE = (4.6, 1.9, 1.6)
CAR_SIZE = (4.5, 1.85, 1.5)
CYCLIST_SIZE = (1.8, 0.7, 1.7)
PEDESTRIAN_SIZE = (0.5, 0.6, 1.75)
CROSSWALK_DEPTH = 3.0
DRIVER = DriverParams()
ONCOMING_RUNOUT = 300.0  # straight road beyond the ego's start, where oncoming traffic drives off


@dataclass
class _Walkway:
    center: FloatArray
    across: FloatArray  # unit, to the left of the ego's travel
    half_length: float
    pedestrians: list[int] = field(default_factory=list)

    def corners(self) -> FloatArray:
        along = np.array([self.across[1], -self.across[0]]) * CROSSWALK_DEPTH / 2
        half = self.across * self.half_length
        return np.stack([self.center - half - along, self.center + half - along,
                         self.center + half + along, self.center - half + along])


@dataclass
class _Layout:
    kind: str
    command: str
    lane_width: float
    ego: Path
    lanes: list[Path]
    limits: list[tuple[float, float]]
    junction: FloatArray | None = None
    stop_s: float | None = None
    turn: tuple[float, float] | None = None
    walkways: list[_Walkway] = field(default_factory=list)


def _winding(rng: np.random.Generator, length: float, k_max: float) -> list[Segment]:
    """Holds and clothoid ramps of curvature; steers back once the heading strays past ~55°."""
    segs: list[Segment] = []
    k, heading, total = 0.0, 0.0, 0.0
    while total < length:
        hold = float(rng.uniform(10, 60))
        ramp = float(rng.uniform(15, 40))
        sign = -np.sign(heading) if abs(heading) > 0.95 else rng.choice([-1.0, 1.0])
        new_k = 0.0 if rng.random() < 0.3 else float(sign * rng.uniform(1 / 300, k_max))
        segs += [(hold, k, k), (ramp, k, new_k)]
        heading += k * hold + 0.5 * (k + new_k) * ramp
        k, total = new_k, total + hold + ramp
    return [*segs, (20.0, k, 0.0)]


def _polyline(path: Path, step: float = 0.5) -> FloatArray:
    """The path as points every ``step`` metres of arc length (ends included), for the map."""
    return path.pose(np.linspace(0.0, path.length, math.ceil(path.length / step) + 1))[0]


def _frame(yaw: float) -> tuple[FloatArray, FloatArray]:
    return np.array([np.cos(yaw), np.sin(yaw)]), np.array([-np.sin(yaw), np.cos(yaw)])


def _square(center: FloatArray, t: FloatArray, n: FloatArray, half: float) -> FloatArray:
    return np.stack([center + half * (sx * t + sy * n) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))])


def _winding_layout(rng: np.random.Generator, w: float, limit: float, reach: float, start: FloatArray,
                    yaw0: float) -> tuple[_Layout, float]:
    ego = Path.from_segments(start, yaw0, [(LEAD_IN, 0.0, 0.0), *_winding(rng, reach, 1 / 35)])
    lay = _Layout("winding", "go straight", w, ego, [ego], [(0.0, limit)])
    if rng.random() < 0.4:
        p, yaw = ego.pose(LEAD_IN + float(rng.uniform(25, 140)))
        n = _frame(float(yaw))[1]
        lay.walkways.append(_Walkway(p + n * w / 2, n, w))
    return lay, LEAD_IN + float(rng.uniform(30, 160))


def _junction_layout(rng: np.random.Generator, w: float, limit: float, reach: float, start: FloatArray,
                     yaw0: float, v_start: float) -> tuple[_Layout, float]:
    command = str(rng.choice(["turn left", "turn right", "go straight"], p=[0.4, 0.4, 0.2]))
    # Far enough to stop at the junction comfortably from the starting speed.
    approach_len = float(np.clip(max(v_start, 6.0) * rng.uniform(1.5, 8.0), v_start**2 / 3.0 + 15, 160))
    approach: list[Segment] = [(LEAD_IN, 0.0, 0.0)]
    if approach_len > 60:
        approach += [*_winding(rng, approach_len - 45, 1 / 90), (25.0, 0.0, 0.0)]
    else:
        approach.append((approach_len, 0.0, 0.0))
    base = Path.from_segments(start, yaw0, approach)
    t, n = _frame(float(base.yaw[-1]))
    radius = float(rng.uniform(w + 5.5, w + 9.0) if command == "turn left" else rng.uniform(5.5, 8.0))
    # Junction frame: x along the approach, 0 at the centre. Going in: the stop line, then the
    # crossing, both before the turn begins so that a turning car never sweeps over a waiting walker.
    x_arc = {"turn left": w / 2 - radius, "turn right": -w / 2 - radius}.get(command, -(w + 2))
    x_cross = min(x_arc, -(w + 1)) - CROSSWALK_DEPTH / 2 - 1.0
    x_stop = x_cross - CROSSWALK_DEPTH / 2 - 1.0
    x_end = x_stop - 3.0  # where the approach ends
    center = base.xy[-1] - x_end * t + n * w / 2
    exit_len = reach + LEAD_IN - base.length
    segs = list(approach)
    if command == "go straight":
        segs.append((exit_len - x_end, 0.0, 0.0))
    else:
        k = 1 / radius if command == "turn left" else -1 / radius
        segs += [(x_arc - x_end, 0.0, 0.0), (radius * np.pi / 2, k, k), (exit_len, 0.0, 0.0)]
    ego = Path.from_segments(start, yaw0, segs)
    road_a = Path.from_segments(start, yaw0, [*approach, (100.0 - x_end, 0.0, 0.0)])
    road_b = Path.from_segments(center + t * w / 2 - 100 * n, float(np.arctan2(n[1], n[0])), [(200.0, 0.0, 0.0)])
    lanes = [ego, road_a, road_a.offset(w).reversed(), road_b, road_b.offset(w).reversed()]
    half = (radius + w / 2 if command != "go straight" else w) + 0.5  # no lane paint in here
    lay = _Layout("junction", command, w, ego, lanes, [(0.0, limit)], junction=_square(center, t, n, half))
    if command != "go straight":
        turn_start = base.length + x_arc - x_end
        lay.turn = (turn_start, turn_start + radius * np.pi / 2)
    if rng.random() < 0.35:
        lay.stop_s = base.length + x_stop - x_end
    if rng.random() < 0.4:
        lay.walkways.append(_Walkway(center + x_cross * t, n, w))
    return lay, (lay.turn[1] if lay.turn else base.length - x_end) + float(rng.uniform(5, 30))


def _layout(rng: np.random.Generator, duration_s: float, v_frac: float) -> tuple[_Layout, Path]:
    """The road and its map extras, and the oncoming lane (then a straight run-out past the ego's start)."""
    w = float(rng.uniform(3.2, 3.8))
    limit = float(rng.choice(SPEED_LIMITS))
    start, yaw0 = rng.uniform(-500, 500, size=2), float(rng.uniform(-np.pi, np.pi))
    reach = 18.0 * duration_s + 150.0  # more road ahead than the ego can cover
    if rng.random() < 0.3:
        lay, sign_s = _winding_layout(rng, w, limit, reach, start, yaw0)
    else:
        lay, sign_s = _junction_layout(rng, w, limit, reach, start, yaw0, v_frac * limit)
    if rng.random() < 0.35:
        lay.limits.append((sign_s, float(rng.choice([v for v in SPEED_LIMITS if v != limit]))))
    oncoming = lay.ego.offset(w).reversed().extended(ONCOMING_RUNOUT)
    lay.lanes.insert(1, oncoming)
    return lay, oncoming


def _crossings(lay: _Layout, path: Path) -> tuple[Crossing, ...]:
    out = []
    for wk in lay.walkways:
        s = path.to_frenet(wk.center)[0]
        lane_u = float((path.pose(s)[0] - wk.center) @ wk.across)
        out.append(Crossing(s, CROSSWALK_DEPTH, wk.center, wk.across, wk.half_length, lane_u,
                            lay.lane_width / 2, tuple(wk.pedestrians)))
    return tuple(out)


def _desired_gap(v: FloatArray | float, dv: FloatArray | float) -> FloatArray:
    """IDM's desired gap s*: obstacles that appear no closer than this are met by gentle braking."""
    p = DRIVER
    v_arr = np.asarray(v, dtype=np.float64)
    return p.min_gap + v_arr * p.headway_s + v_arr * np.asarray(dv) / (2 * np.sqrt(p.max_accel * p.comfort_decel))


def _safe_to_step_out(wk: _Walkway, plans: list[VehiclePlan], arcs: FloatArray) -> npt.NDArray[np.bool_]:
    """(T,) whether every vehicle of a first, pedestrian-free run could brake comfortably for
    someone stepping onto ``wk`` now, or has already gone by."""
    safe = np.ones(arcs.shape[1], dtype=bool)
    for plan, arc in zip(plans, arcs, strict=True):
        gap = gap_to_crossing(plan.path, wk.center, wk.half_length, arc[:, 0] + plan.length / 2, CROSSWALK_DEPTH)
        if gap is not None:
            safe &= safe_to_step_out(gap, arc[:, 1], plan.length, CROSSWALK_DEPTH)
    return safe


def _with_crossings(lay: _Layout, plans: list[VehiclePlan]) -> list[VehiclePlan]:
    return [VehiclePlan(p.path, p.s_init, p.v_init, p.length, p.speed_cap, p.stop_s, _crossings(lay, p.path),
                        p.leader, p.desire_scale, p.params) for p in plans]


def _pedestrians(rng: np.random.Generator, lay: _Layout, plans: list[VehiclePlan], arcs: FloatArray, ego: int,
                 dt: float) -> tuple[list[FloatArray], list[Walker], list[VehiclePlan], FloatArray]:
    """Add walkers one at a time: each steps out when the ego is a little beyond IDM's desired
    gap from the crossing (so it brakes gently) and no vehicle, in a run with the walkers placed
    so far, is too close to stop. Returns (T, 5) states, who they are, the plans with crossings, and the run."""
    n_steps = arcs.shape[1]
    times = np.arange(n_steps) * dt
    tracks: list[FloatArray] = []
    walkers: list[Walker] = []
    for wk in lay.walkways:
        s_cw = lay.ego.to_frenet(wk.center)[0]
        gap = s_cw - CROSSWALK_DEPTH / 2 - 1.0 - (arcs[ego, :, 0] + EGO_SIZE[0] / 2)
        ready = np.nonzero(gap <= _desired_gap(arcs[ego, :, 1], arcs[ego, :, 1]) + rng.uniform(0, 20))[0]
        t_go = float(times[ready[0]]) if ready.size else float(rng.uniform(0, times[-1]))
        sides = rng.choice([-1.0, 1.0], size=2)
        for j in range(int(rng.integers(1, 3))):
            side = float(sides[j])
            along = np.array([wk.across[1], -wk.across[0]]) * rng.uniform(-1, 1) * CROSSWALK_DEPTH / 3
            start = wk.center + along - side * wk.across * (wk.half_length + rng.uniform(1.0, 2.5))
            total = float(side * ((wk.center - start) @ wk.across)) + wk.half_length + 2.0
            v_walk = float(rng.uniform(1.1, 1.6))
            wanted = t_go + 1.5 * j + float(rng.uniform(-0.5, 0.5))
            ok = np.nonzero(_safe_to_step_out(wk, plans, arcs) & (times >= wanted))[0]
            t0 = float(times[ok[0]]) if ok.size else math.inf  # no gap in traffic: they wait
            speed = walk_speed(times - t0, v_walk)
            dist = np.minimum(np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * dt)]), total)
            speed = np.gradient(dist, dt)
            xy = start + np.outer(dist, side * wk.across)
            yaw = np.full(n_steps, math.atan2(side * wk.across[1], side * wk.across[0]))
            wk.pedestrians.append(len(tracks))
            walkers.append(Walker(start, side * wk.across, total, v_walk, wanted, wk.center, wk.half_length))
            tracks.append(np.column_stack([xy, yaw, speed, np.gradient(speed, dt)]))
            plans = _with_crossings(lay, plans)
            states = np.stack(tracks)
            heading = np.stack([np.cos(states[..., 2]), np.sin(states[..., 2])], axis=-1)
            arcs = simulate(plans, n_steps, dt, states[..., :2], heading * states[..., 3:4])
    return tracks, walkers, plans, arcs


@dataclass(frozen=True, eq=False)
class WorldSpec:
    """What a closed loop needs beyond the :class:`Scene`: the ego's route and IDM plan, the plan of every other
    vehicle (in the order of the scene's vehicle and cyclist agents, ``leader`` indexing among them), every walker
    (in the order of the pedestrian agents, which follow the vehicles) and the expert ego's run, (T, 3) arc length,
    speed and acceleration along ``route``."""

    route: Path
    ego_plan: VehiclePlan
    vehicle_plans: tuple[VehiclePlan, ...]
    walkers: tuple[Walker, ...]
    expert_arc: FloatArray
    crosswalk_depth: float = CROSSWALK_DEPTH


def generate_scene(seed: int, duration_s: float = 20.0, dt: float = 0.1) -> Scene:
    """One synthetic scene; the same seed (and duration, dt) gives bytes-equal arrays."""
    return generate_world(seed, duration_s, dt)[0]


def _others(plans: list[VehiclePlan], ego_index: int) -> tuple[VehiclePlan, ...]:
    """Every plan but the ego's, leaders re-indexed (no vehicle follows the ego in a generated scene)."""
    new = {old: k for k, old in enumerate(i for i in range(len(plans)) if i != ego_index)}
    return tuple(replace(p, leader=None if p.leader is None else new[p.leader])
                 for i, p in enumerate(plans) if i != ego_index)


def generate_world(seed: int, duration_s: float = 20.0, dt: float = 0.1) -> tuple[Scene, WorldSpec]:
    """:func:`generate_scene`'s scene and the plans it was simulated from (:class:`WorldSpec`)."""
    if duration_s <= 0 or dt <= 0:
        raise ValueError(f"duration_s and dt must be positive, got {duration_s}, {dt}")
    rng = np.random.default_rng(seed)
    n_steps = round(duration_s / dt) + 1
    v_frac = 0.0 if rng.random() < 0.12 else float(rng.uniform(0.5, 1.05))
    lay, oncoming = _layout(rng, duration_s, v_frac)
    params = DRIVER
    ego_cap = speed_envelope(lay.ego, lay.limits, 1.0, params)
    v_ego = min(v_frac * lay.limits[0][1], float(np.interp(LEAD_IN, lay.ego.s, ego_cap)))

    plans: list[VehiclePlan] = []
    sizes: list[tuple[str, tuple[float, float, float]]] = []
    if rng.random() < 0.45:
        cyclist = rng.random() < 0.2
        size = CYCLIST_SIZE if cyclist else CAR_SIZE
        limits = [(0.0, float(rng.uniform(4.0, 6.5)))] if cyclist else lay.limits
        cap = speed_envelope(lay.ego, limits, 1.0 if cyclist else float(rng.uniform(0.55, 0.95)), params)
        scale = np.ones(n_steps)
        if not cyclist and rng.random() < 0.3:
            t_brake = int(rng.uniform(3, 14) / dt)
            scale[t_brake : t_brake + int(rng.uniform(2, 4) / dt)] = rng.uniform(0.2, 0.5)
        v_lead = min(v_ego * float(rng.uniform(0.7, 1.0)), float(cap.min()) + 3.0)
        gap = max(float(rng.uniform(8, 40)), float(_desired_gap(v_ego, v_ego - v_lead)) + 2.0)
        s_lead = LEAD_IN + EGO_SIZE[0] / 2 + gap + size[0] / 2
        v_lead = min(v_lead, float(np.interp(s_lead, lay.ego.s, cap)))
        plans.append(VehiclePlan(lay.ego, s_lead, v_lead, size[0], cap, lay.stop_s, desire_scale=scale))
        sizes.append(("cyclist" if cyclist else "vehicle", size))
    ego_index = len(plans)
    plans.append(VehiclePlan(lay.ego, LEAD_IN, v_ego, EGO_SIZE[0], ego_cap, lay.stop_s,
                             leader=ego_index - 1 if ego_index else None))
    ahead = np.cumsum(rng.uniform([15, 30, 30], [120, 100, 100]))[: int(rng.integers(0, 4))]
    on_cap = speed_envelope(oncoming, [(0.0, lay.limits[0][1])], float(rng.uniform(0.7, 1.0)), params)
    for k, dist in enumerate(ahead):
        s0 = oncoming.length - ONCOMING_RUNOUT - LEAD_IN - float(dist)
        plans.append(VehiclePlan(oncoming, s0, float(np.interp(s0, oncoming.s, on_cap)), CAR_SIZE[0], on_cap,
                                 leader=len(plans) - 1 if k else None))
        sizes.append(("vehicle", CAR_SIZE))

    peds, walkers, plans, arcs = _pedestrians(rng, lay, plans, simulate(plans, n_steps, dt), ego_index, dt)

    agents = []
    others = [i for i in range(len(plans)) if i != ego_index]
    for agent_id, (i, (kind, size)) in enumerate(zip(others, sizes, strict=True), start=1):
        agents.append(Agent(agent_id, kind, size, track_on_path(plans[i].path, arcs[i])))
    for states in peds:
        agents.append(Agent(len(agents) + 1, "pedestrian", PEDESTRIAN_SIZE, Track(states)))
    ego_arc = arcs[ego_index]
    steps = {}
    if lay.turn is not None:
        for key, s_mark in zip(("turn_start_step", "turn_end_step"), lay.turn, strict=True):
            hit = np.nonzero(ego_arc[:, 0] >= s_mark)[0]
            steps[key] = int(hit[0]) if hit.size else -1
    road = Road(_polyline(lay.ego), lay.lane_width, lay.limits[0][1], tuple(_polyline(p) for p in lay.lanes),
                lay.stop_s, junctions=() if lay.junction is None else (lay.junction,),
                crosswalks=tuple(wk.corners() for wk in lay.walkways), speed_limits=tuple(lay.limits))
    meta: dict[str, object] = {
        "synthetic": True, "layout": lay.kind, "lead": ego_index > 0, "stop_line": lay.stop_s is not None,
        "pedestrians": len(peds), "speed_limit_change": len(lay.limits) > 1,
        "ego_start_s": LEAD_IN, **steps,
    }
    if lay.turn is not None:
        meta["turn_start_s"], meta["turn_end_s"] = lay.turn
    scene = Scene(seed, f"synthetic-{seed:06d}", dt, track_on_path(lay.ego, ego_arc), tuple(agents), road,
                  lay.command, EGO_SIZE, meta)
    return scene, WorldSpec(lay.ego, plans[ego_index], _others(plans, ego_index), tuple(walkers), ego_arc)
