"""Score a recorded ROS run: each planned ``nav_msgs/Path`` against the future odometry of the source bag.

No ROS needed: both bags are read with ``rosbags``. A path stamped ``t0`` (the planner stamps it with
its camera frame) holds waypoint k at ``(k + 1) / waypoint_rate_hz`` seconds (the driving schema's grid;
a ``nav_msgs/Path`` carries no per-waypoint times). Its frame is either the odometry's child frame (the
ego frame at t0, x forward, y left) or the odometry's parent frame (moved into the ego frame at t0).
The truth is the source bag's odometry at ``t0 + t`` in the ego frame at t0, interpolated as the
rosbag2 eval source does (:class:`~blockpilot.eval.mcap_track.OdomTrack`); a waypoint past the end of
the odometry is invalid.

Each path becomes one record in the evaluator's results schema (:mod:`blockpilot.eval.records`), with
a constant-velocity baseline, and the records are aggregated by :mod:`blockpilot.eval.summary`, so
the numbers follow the same conventions as ``blockpilot eval``: ``l2_m`` is the L2 at 1, 2 and 3 s
("at t", UniAD) over the paths whose future is fully covered, and ``avg`` their mean.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import BlockpilotError
from ..eval.mcap_track import OdomTrack
from ..eval.metrics import l2_errors
from ..eval.summary import HORIZONS_S, hkey, summarize_predictor
from ..geometry import constant_velocity, quaternion_yaw, to_ego_frame
from .conversions import stamp_ns

PATH_TYPE, ODOM_TYPE, STRING_TYPE = "nav_msgs/msg/Path", "nav_msgs/msg/Odometry", "std_msgs/msg/String"
DEFAULT_WAYPOINT_RATE_HZ = 2.0  # the driving-nuscenes schema: 6 waypoints, 0.5 s apart


class BagError(BlockpilotError):
    """A bag that cannot be used: missing, not a bag, several where one is needed, unreadable, or
    lacking a topic the caller needs."""


class ScoreError(BagError):
    """A recorded run that cannot be scored (no odometry, a path in an unknown frame)."""


def resolve_bag(path: str | Path) -> Path:
    """The one bag ``path`` names: an ``.mcap`` file, a rosbag2 directory, or a folder holding exactly one."""
    from ..eval.mcap import find_bags
    from ..eval.types import DatasetError

    root = Path(path)
    if root.is_file():
        if root.suffix != ".mcap":
            raise BagError(f"{root} is a file but not an .mcap file")
        return root
    try:
        bags = find_bags(root)
    except DatasetError as exc:
        raise BagError(str(exc)) from None
    if len(bags) > 1:
        raise BagError(f"{root} holds {len(bags)} bags ({', '.join(b.name for b in bags)}); name one")
    return bags[0]


@contextmanager
def _reader(bag: Path) -> Iterator[Any]:
    """:func:`blockpilot.eval.mcap.open_bag`, its failures as :class:`BagError`."""
    from ..eval.mcap import open_bag
    from ..eval.types import DatasetError

    try:
        with open_bag(bag) as reader:
            yield reader
    except DatasetError as exc:
        raise BagError(str(exc)) from exc


def _messages(reader: Any, bag: Path, topic: str, msgtype: str) -> Iterator[tuple[int, Any]]:
    """(receive stamp, message) of ``topic``; BagError if the bag lacks it or holds another type."""
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        topics = ", ".join(sorted({c.topic for c in reader.connections})) or "none"
        raise BagError(f"rosbag2 {bag} has no topic {topic}; its topics: {topics}")
    for conn in conns:
        if conn.msgtype != msgtype:
            raise BagError(f"rosbag2 {bag}: topic {topic} is {conn.msgtype}, expected {msgtype}")
    for conn, log_ns, raw in reader.messages(conns):
        yield log_ns, reader.deserialize(raw, conn.msgtype)


@dataclass(frozen=True)
class SourceOdometry:
    """The source bag's odometry track and its frames (parent: the world frame; child: the ego frame)."""

    track: OdomTrack
    world_frame: str
    ego_frame: str


def read_odometry(bag: str | Path, topic: str = "/odom") -> SourceOdometry:
    """The ``nav_msgs/Odometry`` track of ``bag``; ScoreError if it holds none."""
    path = resolve_bag(bag)
    rows: list[tuple[int, float, float, float, float]] = []
    frames: set[tuple[str, str]] = set()
    with _reader(path) as reader:
        for _, msg in _messages(reader, path, topic, ODOM_TYPE):
            pose, q = msg.pose.pose.position, msg.pose.pose.orientation
            rows.append((stamp_ns(msg.header.stamp), pose.x, pose.y, quaternion_yaw((q.w, q.x, q.y, q.z)),
                         msg.twist.twist.linear.x))
            frames.add((str(msg.header.frame_id), str(msg.child_frame_id)))
    if len(rows) < 2:
        raise ScoreError(f"rosbag2 {path}: topic {topic} holds {len(rows)} odometry messages; scoring needs two")
    if len(frames) != 1:
        raise ScoreError(f"rosbag2 {path}: odometry changes frames: {sorted(frames)}")
    world, ego = frames.pop()
    return SourceOdometry(OdomTrack.from_rows(rows), world, ego)


@dataclass(frozen=True)
class RecordedPath:
    stamp_ns: int
    frame_id: str
    xy: npt.NDArray[np.float64]


def read_paths(bag: str | Path, topic: str) -> list[RecordedPath]:
    """Every ``nav_msgs/Path`` on ``topic`` of ``bag``, in recorded order."""
    path = resolve_bag(bag)
    out = []
    with _reader(path) as reader:
        for _, msg in _messages(reader, path, topic, PATH_TYPE):
            xy = np.array([[p.pose.position.x, p.pose.position.y] for p in msg.poses], dtype=np.float64)
            out.append(RecordedPath(stamp_ns(msg.header.stamp), str(msg.header.frame_id), xy.reshape(-1, 2)))
    return out


def _plan_counts(bag: Path, topic: str) -> dict[str, int]:
    counts = Counter({"messages": 0, "parse_errors": 0, "not_json": 0})
    with _reader(bag) as reader:
        if not any(c.topic == topic for c in reader.connections):
            return dict(counts)
        for _, msg in _messages(reader, bag, topic, STRING_TYPE):
            counts["messages"] += 1
            try:
                body = json.loads(str(msg.data))
            except json.JSONDecodeError:
                counts["not_json"] += 1
                continue
            counts["parse_errors"] += isinstance(body, dict) and body.get("parse_error") is not None
    return dict(counts)


def path_record(path: RecordedPath, odom: SourceOdometry, waypoint_rate_hz: float) -> dict[str, Any]:
    """One path as an evaluator record (``status``, ``predictions`` and ``metrics`` for model and cv), or a
    ``skipped`` record saying why (empty, or stamped outside the odometry)."""
    track = odom.track
    record: dict[str, Any] = {"sample_id": f"path/{path.stamp_ns}", "source": "ros", "scene": "recorded",
                              "timestamp_us": path.stamp_ns // 1000, "frame": "ego"}
    if not len(path.xy):
        return {**record, "status": "skipped", "error": "empty path"}
    if not track.first_ns <= path.stamp_ns <= track.last_ns:
        return {**record, "status": "skipped", "error": "stamped outside the source odometry"}
    x0, y0, yaw0, speed = track.at(path.stamp_ns)
    origin = np.array([x0, y0])
    if path.frame_id == odom.world_frame:
        xy = to_ego_frame(path.xy, origin, yaw0)
    elif path.frame_id == odom.ego_frame:
        xy = path.xy
    else:
        raise ScoreError(f"a path at {path.stamp_ns} ns is in frame {path.frame_id!r}; scoring knows the odometry's "
                         f"frames {odom.world_frame!r} (world) and {odom.ego_frame!r} (ego)")
    times = np.arange(1, len(xy) + 1, dtype=np.float64) / waypoint_rate_hz
    future_ns = [path.stamp_ns + round(t * 1e9) for t in times]
    valid = [t <= track.last_ns for t in future_ns]
    gt = to_ego_frame(track.xy_at(future_ns), origin, yaw0)
    cv = constant_velocity(speed, times)
    metrics = {name: {"times_s": times.tolist(), "l2": l2_errors(pred, gt).tolist(), "valid": valid}
               for name, pred in (("model", xy), ("cv", cv))}
    return {**record, "status": "ok", "error": None, "speed_mps": speed,
            "gt": {"times_s": times.tolist(), "xy": gt.tolist(), "valid": valid},
            "predictions": {"model": {"times_s": times.tolist(), "xy": xy.tolist()},
                            "cv": {"times_s": times.tolist(), "xy": cv.tolist()}},
            "metrics": metrics}


def score_run(recorded: str | Path, source: str | Path, *, path_topic: str | None = None,
              odometry_topic: str = "/odom", plan_json_topic: str | None = None,
              waypoint_rate_hz: float = DEFAULT_WAYPOINT_RATE_HZ) -> dict[str, Any]:
    """Summary of a recorded run against its source bag (see the module docstring). ``path_topic`` and
    ``plan_json_topic`` default to the planner's defaults."""
    from .params import PlannerParams

    if not waypoint_rate_hz > 0:
        raise ScoreError(f"waypoint_rate_hz must be positive, got {waypoint_rate_hz}")
    defaults = PlannerParams()
    path_topic = path_topic or defaults.path_topic
    plan_json_topic = plan_json_topic or defaults.plan_json_topic
    odom = read_odometry(source, odometry_topic)
    recorded_bag = resolve_bag(recorded)
    records = [path_record(p, odom, waypoint_rate_hz) for p in read_paths(recorded_bag, path_topic)]
    model, cv = summarize_predictor(records, "model"), summarize_predictor(records, "cv")
    return {
        "recorded": str(recorded_bag), "source": str(resolve_bag(source)),
        "topics": {"path": path_topic, "odometry": odometry_topic, "plan_json": plan_json_topic},
        "waypoint_rate_hz": waypoint_rate_hz, "paths": len(records),
        "scored": sum(r["status"] == "ok" for r in records),
        "skipped": dict(Counter(str(r["error"]) for r in records if r["status"] == "skipped")),
        "l2_m": {k: model["l2"]["uniad"][k] for k in [*(hkey(h) for h in HORIZONS_S), "avg"]},
        "cv_l2_m": {k: cv["l2"]["uniad"][k] for k in [*(hkey(h) for h in HORIZONS_S), "avg"]},
        "model": model, "cv": cv,
        "plans": _plan_counts(recorded_bag, plan_json_topic),
    }
