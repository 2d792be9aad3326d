"""ROS 2 messages to and from what the :class:`~blockpilot.runtime.planner.Planner` reads and writes.

Pure functions over message objects (no node, no executor): camera images to ``HxWx3`` uint8 RGB,
odometry to an :class:`OdomSample` and a short :class:`OdomHistory` that yields the prompt's
:class:`~blockpilot.vla.prompt.EgoState` at a camera stamp, plan waypoints to ``nav_msgs/Path`` and
``geometry_msgs/PoseArray``, and a plan to JSON. Every refusal is a :class:`ConversionError` whose
``kind`` says what went wrong, so the node can count and diagnose it.

The ego state follows the replay sources (``eval/mcap.py``): positions and yaw from the odometry
pose, forward speed from ``twist.linear.x`` (the twist is in the child frame), everything
interpolated linearly at the camera stamp (yaw unwrapped first); the past positions sit at
:data:`PAST_TIMES_S` in the ego frame at that instant (x forward, y left); acceleration is the
backward difference of the speed over :data:`ACCEL_WINDOW_S`.
"""

from __future__ import annotations

import io
import json
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import BlockpilotError
from ..geometry import to_ego_frame
from ..runtime.plan_types import Plan
from ..vla.prompt import EgoState

# The past instants the reference model was trained on (blockpilot.sim.samples.PAST_TIMES_S).
PAST_TIMES_S = (-2.0, -1.5, -1.0, -0.5)
ACCEL_WINDOW_S = 0.5
HISTORY_KEEP_NS = 3_000_000_000  # history older than this before the newest sample is pruned
HISTORY_MAX_SAMPLES = 4096  # hard bound whatever the odometry rate
HISTORY_SLACK_NS = 100_000_000  # the oldest past instant may lie this far before the history starts
RAW_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
MAX_PIXELS = 4096 * 4096

ImageArray = npt.NDArray[np.uint8]


class ConversionError(BlockpilotError, ValueError):
    """A message cannot be used; ``kind`` is the diagnostics category it counts under."""

    kind = "malformed_input"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class ImageError(ConversionError):
    kind = "malformed_image"


class OdometryError(ConversionError):
    """Odometry missing, stale, too short for the prompt's history, or non-finite (see ``kind``)."""

    kind = "stale_odometry"


def stamp_ns(stamp: Any) -> int:
    """Nanoseconds of a ``builtin_interfaces/Time``."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def time_msg(ns: int) -> Any:
    from builtin_interfaces.msg import Time

    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


# ---- camera ------------------------------------------------------------------------------------


def image_from_raw(msg: Any) -> ImageArray:
    """RGB ``(H, W, 3)`` uint8 of a ``sensor_msgs/Image`` (rgb8, bgr8, rgba8, bgra8, mono8; rows may be padded)."""
    encoding = str(msg.encoding).lower()
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    channels = RAW_CHANNELS.get(encoding)
    if channels is None:
        raise ImageError(f"unsupported image encoding {msg.encoding!r}; use one of {', '.join(RAW_CHANNELS)}")
    if height <= 0 or width <= 0 or height * width > MAX_PIXELS:
        raise ImageError(f"image size {width}x{height} is empty or too large")
    if step < width * channels:
        raise ImageError(f"row step {step} is shorter than {width} pixels of {encoding} ({width * channels} bytes)")
    data = memoryview(msg.data).cast("B")
    if len(data) != height * step:
        raise ImageError(f"{len(data)} data bytes do not hold a {width}x{height} {encoding} image with row step "
                         f"{step} ({height * step} bytes expected)")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(height, step)
    pixels = rows[:, : width * channels].reshape(height, width, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    rgb = pixels[..., 2::-1] if encoding.startswith("bgr") else pixels[..., :3]
    return np.ascontiguousarray(rgb)


def image_from_compressed(msg: Any) -> ImageArray:
    """RGB ``(H, W, 3)`` uint8 of a ``sensor_msgs/CompressedImage`` (JPEG, PNG: whatever Pillow reads)."""
    from PIL import Image

    data = bytes(memoryview(msg.data).cast("B"))
    if not data:
        raise ImageError(f"compressed image ({msg.format!r}) has no data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"compressed image of {img.width}x{img.height} is too large")
            img.load()
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"compressed image ({msg.format!r}, {len(data)} bytes) cannot be decoded: "
                         f"{type(exc).__name__}: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


# ---- odometry ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OdomSample:
    """One ``nav_msgs/Odometry``: pose in its parent frame, forward speed and yaw rate in the child frame."""

    stamp_ns: int
    x: float
    y: float
    yaw: float
    speed_mps: float
    yaw_rate: float


def odom_sample(msg: Any) -> OdomSample:
    """The sample of a ``nav_msgs/Odometry``; :class:`OdometryError` (kind ``nonfinite_odometry``) names a
    non-finite field or an orientation of zero norm."""
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    lin, ang = msg.twist.twist.linear, msg.twist.twist.angular
    checked = {"pose.position.x": p.x, "pose.position.y": p.y, "pose.orientation.x": q.x, "pose.orientation.y": q.y,
               "pose.orientation.z": q.z, "pose.orientation.w": q.w, "twist.linear.x": lin.x,
               "twist.angular.z": ang.z}
    bad = [name for name, value in checked.items() if not math.isfinite(value)]
    if bad:
        raise OdometryError(f"odometry holds non-finite values in {', '.join(bad)}", "nonfinite_odometry")
    norm = math.sqrt(q.w * q.w + q.x * q.x + q.y * q.y + q.z * q.z)
    if norm < 1e-9:
        raise OdometryError("odometry orientation is a quaternion of zero norm", "nonfinite_odometry")
    w, x, y, z = q.w / norm, q.x / norm, q.y / norm, q.z / norm
    yaw = math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return OdomSample(stamp_ns(msg.header.stamp), float(p.x), float(p.y), yaw, float(lin.x), float(ang.z))


class OdomHistory:
    """The last few seconds of odometry, bounded in time and count, and the most recent refusal.

    Not thread-safe: the node guards it with its own lock. A non-finite message is not stored, but
    until the next good one every ego state is refused: planning on the odometry from before a fault
    would hide it.
    """

    def __init__(self, keep_ns: int = HISTORY_KEEP_NS, max_samples: int = HISTORY_MAX_SAMPLES) -> None:
        self.keep_ns = keep_ns
        self.samples: deque[OdomSample] = deque(maxlen=max_samples)
        self.fault: OdometryError | None = None
        self._newest = 0

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, sample: OdomSample) -> None:
        if self.samples and sample.stamp_ns < self._newest - 1_000_000_000:
            self.samples.clear()  # the clock jumped back (a replay restarted): the old track is another drive
        self._newest = max(self._newest, sample.stamp_ns) if self.samples else sample.stamp_ns
        self.samples.append(sample)
        self.fault = None
        while self.samples[0].stamp_ns < self._newest - self.keep_ns:
            self.samples.popleft()

    def refuse(self, error: OdometryError) -> None:
        self.fault = error

    def ego_state(self, at_ns: int, max_age_ns: int) -> EgoState:
        """The ego state at camera stamp ``at_ns``; :class:`OdometryError` when odometry is missing,
        faulty, older than ``max_age_ns`` at that stamp, or does not reach back to the oldest past instant."""
        if self.fault is not None:
            raise OdometryError(f"latest odometry refused: {self.fault}", self.fault.kind)
        if not self.samples:
            raise OdometryError("no odometry received yet", "no_odometry")
        rows = sorted(self.samples, key=lambda s: s.stamp_ns)
        t = np.array([s.stamp_ns for s in rows], dtype=np.int64)
        age_ns = at_ns - int(t[-1])
        if age_ns > max_age_ns:
            raise OdometryError(f"stale odometry: the newest is {age_ns / 1e6:.1f} ms older than the camera frame "
                                f"(max {max_age_ns / 1e6:.1f} ms)", "stale_odometry")
        oldest_needed = at_ns + round(min(PAST_TIMES_S) * 1e9)
        if int(t[0]) > oldest_needed + HISTORY_SLACK_NS:
            raise OdometryError(f"odometry history covers {(at_ns - int(t[0])) / 1e9:.2f} s before the camera frame; "
                                f"the prompt needs {-min(PAST_TIMES_S):.1f} s", "short_history")
        grid = (t - t[0]).astype(np.float64) / 1e9

        def at(col: npt.NDArray[np.float64], ns: list[int]) -> npt.NDArray[np.float64]:
            return np.interp((np.asarray(ns, dtype=np.int64) - t[0]).astype(np.float64) / 1e9, grid, col)

        xy = np.array([[s.x, s.y] for s in rows])
        yaw = np.unwrap(np.array([s.yaw for s in rows]))
        speed = np.array([s.speed_mps for s in rows])
        accel_from = at_ns - round(ACCEL_WINDOW_S * 1e9)
        now_xy = np.column_stack([at(xy[:, 0], [at_ns]), at(xy[:, 1], [at_ns])])[0]
        past_ns = [at_ns + round(dt * 1e9) for dt in PAST_TIMES_S]
        past = np.column_stack([at(xy[:, 0], past_ns), at(xy[:, 1], past_ns)])
        v_now, v_before = at(speed, [at_ns, accel_from])
        heading = float(at(yaw, [at_ns])[0])
        return EgoState(past_waypoints=to_ego_frame(past, now_xy, heading), speed_mps=float(v_now),
                        accel_mps2=float((v_now - v_before) / ACCEL_WINDOW_S))


# ---- plan out ----------------------------------------------------------------------------------


def _headings(waypoints: npt.NDArray[np.float64]) -> list[float]:
    """Yaw of each waypoint: the direction from the one before (the ego origin for the first)."""
    out, yaw, prev = [], 0.0, np.zeros(2)
    for point in waypoints[:, :2]:
        d = point - prev
        if float(np.hypot(d[0], d[1])) > 1e-6:
            yaw = math.atan2(float(d[1]), float(d[0]))
        out.append(yaw)
        prev = point
    return out


def _poses(waypoints: npt.NDArray[np.float64]) -> list[Any]:
    from geometry_msgs.msg import Point, Pose, Quaternion

    points = np.asarray(waypoints, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3) or not np.isfinite(points).all():
        raise ConversionError(f"waypoints must be finite (K, 2) or (K, 3), got shape {points.shape}", "invalid_plan")
    poses = []
    for point, yaw in zip(points, _headings(points), strict=True):
        z = float(point[2]) if points.shape[1] == 3 else 0.0
        poses.append(Pose(position=Point(x=float(point[0]), y=float(point[1]), z=z),
                          orientation=Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))))
    return poses


def path_msg(waypoints: npt.NDArray[np.float64], stamp: int, frame_id: str) -> Any:
    """``nav_msgs/Path`` of the waypoints (one pose each, heading along the path) stamped ``stamp`` ns."""
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Path
    from std_msgs.msg import Header

    header = Header(stamp=time_msg(stamp), frame_id=frame_id)
    return Path(header=header, poses=[PoseStamped(header=header, pose=p) for p in _poses(waypoints)])


def pose_array_msg(waypoints: npt.NDArray[np.float64], stamp: int, frame_id: str) -> Any:
    """``geometry_msgs/PoseArray`` of the waypoints: xy(z) positions, headings along the path."""
    from geometry_msgs.msg import PoseArray
    from std_msgs.msg import Header

    return PoseArray(header=Header(stamp=time_msg(stamp), frame_id=frame_id), poses=_poses(waypoints))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def plan_json(plan: Plan, *, stamp: int, frame_id: str, **extra: Any) -> str:
    """The plan as strict JSON (non-finite numbers become null): :meth:`Plan.to_dict` plus the stamp (ns),
    the frame and ``extra``."""
    body = {"stamp_ns": int(stamp), "frame_id": frame_id, **extra, **plan.to_dict()}
    return json.dumps(_finite(body), allow_nan=False, separators=(",", ":"))
