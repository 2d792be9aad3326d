"""Driving labels read off a synthetic scene: what the ego actually does next, and why.

Everything comes from the scene's ground truth at and after a keyframe: the trajectory is the
ego's future in the current ego frame, the meta behaviour is the speed and heading change over
the horizon (a lane change is a sideways shift off the lane centreline), critical objects are
road users that come near the ego's future path and stop lines ahead, and the explanation is a
template filled with those facts. Nothing is invented, so a model can only
learn what the images, the ego state and the route command make predictable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..geometry import to_ego_frame
from ..sim.types import Scene
from ..vla.plans import DrivingPlan, DrivingSchema

FloatArray = npt.NDArray[np.float64]
# Flag names of the driving schema that synthetic scenes can set; every other flag stays False.
AGENT_FLAGS = {"vehicle": "nearby_vehicle", "pedestrian": "pedestrian", "cyclist": "cyclist"}
STOP_LINE_FLAG = "traffic_element"


class KeyframeLike(Protocol):
    """What labelling and prompting need from a sim keyframe (``blockpilot.sim`` makes them)."""

    scene_name: str
    step: int
    time_s: float
    past_xy: FloatArray
    speed: float
    accel: float
    route_command: str
    future_xy: FloatArray
    future_valid: bool


@dataclass(frozen=True, slots=True)
class LabelRules:
    """Thresholds that turn the ego's future into categorical labels."""

    stop_speed: float = 0.5  # m/s at the horizon: below it the ego stops
    speed_change: float = 1.0  # m/s over the horizon: beyond it the ego accelerates / decelerates
    turn_heading: float = 0.35  # rad (about 20°) of heading change over the horizon: a turn
    lane_change_offset: float = 2.5  # m of sideways shift from the lane centreline without a turn: a lane change
    look_ahead: float = 30.0  # m ahead of the ego in which a road user can be critical
    path_half_width: float = 2.5  # m either side of the future path (plus half the agent's width)


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def longitudinal_label(speed_now: float, speed_end: float, rules: LabelRules) -> str:
    if speed_end < rules.stop_speed:
        return "stop"
    if speed_end - speed_now > rules.speed_change:
        return "accelerate"
    if speed_end - speed_now < -rules.speed_change:
        return "decelerate"
    return "keep_speed"


def lateral_label(heading_change: float, lane_shift: float, rules: LabelRules) -> str:
    """``lane_shift``: change of the ego's signed offset from its lane centreline (left > 0)."""
    if heading_change > rules.turn_heading:
        return "left_turn"
    if heading_change < -rules.turn_heading:
        return "right_turn"
    if lane_shift > rules.lane_change_offset:
        return "left_lane_change"
    if lane_shift < -rules.lane_change_offset:
        return "right_lane_change"
    return "straight"


def distance_to_polyline(points: FloatArray, polyline: FloatArray) -> FloatArray:
    """Distance of each point (N, 2) to the nearest segment of ``polyline`` (M >= 2, 2)."""
    a, b = polyline[:-1], polyline[1:]
    ab = b - a
    rel = points[:, None, :] - a[None]
    t = np.clip((rel * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None, :] - nearest, axis=-1).min(axis=1)


def lane_offset(centerline: FloatArray, point: FloatArray) -> float:
    """Signed distance (left of the driving direction > 0) of ``point`` from the ``centerline`` polyline."""
    a, b = centerline[:-1], centerline[1:]
    ab = b - a
    t = np.clip(((point - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    nearest = a + t[:, None] * ab
    i = int(np.argmin(np.linalg.norm(point - nearest, axis=1)))
    rel = point - nearest[i]
    return float(np.sign(ab[i, 0] * rel[1] - ab[i, 1] * rel[0]) * np.linalg.norm(rel))


def _horizon_steps(scene: Scene, schema: DrivingSchema) -> list[int]:
    return [round(t / scene.dt) for t in np.concatenate(([0.0], schema.waypoint_times_s))]


def critical_objects(scene: Scene, step: int, path: FloatArray, schema: DrivingSchema,
                     rules: LabelRules) -> tuple[dict[str, bool], str | None]:
    """Flags of the schema and the kind of the nearest critical road user (None if there is none).

    A road user is critical when, at any waypoint time over the horizon, it is ahead of the ego
    (within ``look_ahead``) and within ``path_half_width`` of the ego's future path.
    """
    flags = dict.fromkeys(schema.critical_object_keys, False)
    origin, yaw = scene.ego.xy[step], float(scene.ego.yaw[step])
    nearest: tuple[float, str] | None = None
    for agent in scene.agents:
        idx = [min(step + k, agent.track.states.shape[0] - 1) for k in _horizon_steps(scene, schema)]
        pts = to_ego_frame(agent.track.xy[idx], origin, yaw)
        near = distance_to_polyline(pts, path) <= rules.path_half_width + agent.size[1] / 2
        ahead = (pts[:, 0] > 0.0) & (pts[:, 0] <= rules.look_ahead)
        hits = near & ahead
        if not hits.any():
            continue
        key = AGENT_FLAGS[agent.kind]
        if key in flags:
            flags[key] = True
        dist = float(np.linalg.norm(pts[hits], axis=1).min())
        if nearest is None or dist < nearest[0]:
            nearest = (dist, agent.kind)
    if _stop_line_ahead(scene, step, rules) and STOP_LINE_FLAG in flags:
        flags[STOP_LINE_FLAG] = True
        if nearest is None:
            return flags, "stop line"
    return flags, None if nearest is None else nearest[1]


def _stop_line_ahead(scene: Scene, step: int, rules: LabelRules) -> bool:
    if scene.road.stop_line_s is None:
        return False
    line = scene.road.centerline
    seg = np.linalg.norm(np.diff(line, axis=0), axis=1)
    arc = np.concatenate(([0.0], np.cumsum(seg)))
    i = int(np.argmin(np.linalg.norm(line - scene.ego.xy[step], axis=1)))
    return 0.0 < scene.road.stop_line_s - arc[i] <= rules.look_ahead


_CAUSES = {None: "The road ahead is clear", "vehicle": "A vehicle is ahead", "pedestrian": "A pedestrian is ahead",
           "cyclist": "A cyclist is ahead", "stop line": "A stop line is ahead"}
_SPEED_ACTIONS = {"stop": "stop", "decelerate": "slow down", "keep_speed": "keep speed", "accelerate": "speed up"}
_PATH_ACTIONS = {"straight": "keep the lane", "left_turn": "turn left", "right_turn": "turn right",
                 "left_lane_change": "change to the left lane", "right_lane_change": "change to the right lane"}


def explanation(cause: str | None, longitudinal: str, lateral: str) -> str:
    return f"{_CAUSES[cause]}, so {_SPEED_ACTIONS[longitudinal]} and {_PATH_ACTIONS[lateral]}."


def derive_plan(scene: Scene, keyframe: KeyframeLike, schema: DrivingSchema,
                rules: LabelRules | None = None) -> DrivingPlan:
    """The label plan of ``keyframe``: its future trajectory and the behaviour and objects behind it."""
    rules = rules or LabelRules()
    if not keyframe.future_valid:
        raise ValueError(f"{keyframe.scene_name} step {keyframe.step}: the future runs past the scene's end")
    future = np.asarray(keyframe.future_xy, dtype=np.float64)
    if future.shape != (schema.num_waypoints, 2):
        raise ValueError(f"future_xy has shape {future.shape}, the schema wants ({schema.num_waypoints}, 2)")
    step = keyframe.step
    end = step + round(schema.horizon_s / scene.dt)
    if end >= scene.num_steps:
        raise ValueError(f"{scene.name}: step {step} + horizon {schema.horizon_s} s is past the last step")
    longitudinal = longitudinal_label(float(scene.ego.speed[step]), float(scene.ego.speed[end]), rules)
    heading = _wrap(float(scene.ego.yaw[end] - scene.ego.yaw[step]))
    line = scene.road.centerline
    shift = lane_offset(line, scene.ego.xy[end]) - lane_offset(line, scene.ego.xy[step])
    lateral = lateral_label(heading, shift, rules)
    path = np.concatenate((np.zeros((1, 2)), future))
    flags, cause = critical_objects(scene, step, path, schema, rules)
    limit = 10.0 ** schema.int_digits - 10.0 ** -schema.frac_digits
    return DrivingPlan(waypoints=np.clip(future, -limit, limit), longitudinal=longitudinal, lateral=lateral,
                       critical_objects=flags, explanation=explanation(cause, longitudinal, lateral))
