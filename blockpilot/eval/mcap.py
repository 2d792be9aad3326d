"""rosbag2 (MCAP) replay: a recorded drive as eval samples, read with ``rosbags``.

The ego motion comes from ``nav_msgs/Odometry`` (position, yaw from the orientation, forward speed from
``twist.linear.x``), interpolated linearly at any instant (yaw unwrapped first). Keyframes are camera
images ``1 / rate_hz`` apart, starting 2 s after the first odometry message so the prompt has its
history, and only while odometry still covers the image's instant. Times are the messages' header
stamps; ``std_msgs/String`` has no header, so route commands use the bag's receive time.

Messages are deserialised with the definitions stored in the bag (ROS 2 Humble's built-in ones for a
bag that stores none). A bag is read twice: once for odometry, IMU, route commands and image stamps,
then for the chosen images, whose bytes are kept only in the samples built from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import quaternion_yaw, to_ego_frame
from ..vla.prompt import ROUTE_COMMANDS, EgoState
from .images import decode_image, decode_raw
from .mcap_track import OdomTrack, latest_at_or_before, nearest_value, select_keyframes
from .types import DatasetError, EvalSample, ImageArray, SampleFailure, Trajectory, route_command_from_future

DEFAULT_FUTURE_TIMES_S = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
PAST_TIMES_S = (-2.0, -1.5, -1.0, -0.5)
HISTORY_NS = 2_000_000_000
ACCEL_WINDOW_S = 0.5  # backward difference of the speed when there is no IMU
IMU_MAX_GAP_NS = 500_000_000  # an IMU message further than this from t0 is not used
IMAGE_TYPES = ("sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/Image")
ODOM_TYPE, IMU_TYPE, ROUTE_TYPE = "nav_msgs/msg/Odometry", "sensor_msgs/msg/Imu", "std_msgs/msg/String"


def find_bags(path: str | Path) -> list[Path]:
    """``path`` if it is a rosbag2 directory (it holds ``metadata.yaml``), else its bag directories by name."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"rosbag2 path {root} does not exist")
    if (root / "metadata.yaml").is_file():
        return [root]
    bags = sorted(p for p in root.iterdir() if (p / "metadata.yaml").is_file()) if root.is_dir() else []
    if not bags:
        raise DatasetError(f"{root} is not a rosbag2 directory (no metadata.yaml) and holds no bag directories")
    return bags


@contextmanager
def open_bag(bag: Path) -> Iterator[Any]:
    """An open ``AnyReader`` on ``bag``; reader failures become :class:`DatasetError` naming the bag."""
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.rosbag2 import ReaderError
    from rosbags.typesys import Stores, get_typestore

    try:
        with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
            yield reader
    except (AnyReaderError, ReaderError, OSError) as exc:
        raise DatasetError(f"rosbag2 {bag} cannot be read: {exc}") from exc


def _stamp_ns(msg: Any) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


@dataclass(frozen=True)
class _BagScan:
    """What the first pass keeps of one bag: the motion, IMU, route commands and the chosen images."""

    odom: OdomTrack
    imu_ns: np.ndarray | None
    imu_accel: np.ndarray | None
    route_ns: np.ndarray | None
    route: tuple[str, ...]
    keyframes: dict[int, int]  # index among the image topic's messages -> header stamp (ns)


@dataclass(frozen=True)
class _Image:
    data: bytes
    raw: tuple[str, int, int, int] | None  # (encoding, height, width, step) of a sensor_msgs/Image


class Rosbag2Source:
    """Samples from one rosbag2 directory or a directory of them (bags in name order)."""

    name = "mcap"

    def __init__(self, path: str | Path, *, image_topic: str = "/camera/front/image_raw/compressed",
                 odom_topic: str = "/odom", route_topic: str = "/route_command", imu_topic: str | None = "/imu/data",
                 rate_hz: float = 2.0, future_times_s: Sequence[float] = DEFAULT_FUTURE_TIMES_S) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        times = tuple(float(t) for t in future_times_s)
        if not times or times[0] <= 0 or bool(np.any(np.diff(times) <= 0)):
            raise ValueError(f"future_times_s must be positive and increasing, got {list(future_times_s)}")
        self.path = Path(path)
        self.bags = find_bags(self.path)
        self.image_topic, self.odom_topic, self.route_topic, self.imu_topic = (
            image_topic, odom_topic, route_topic, imu_topic)
        self.rate_hz = float(rate_hz)
        self.future_times_s = times
        self._scans: dict[Path, _BagScan] = {}
        self._types: dict[Path, dict[str, str]] = {}
        for bag in self.bags:
            with open_bag(bag) as reader:
                self._types[bag] = self._check_topics(bag, {c.topic: c.msgtype for c in reader.connections})

    def _check_topics(self, bag: Path, types: dict[str, str]) -> dict[str, str]:
        listing = ", ".join(f"{t} ({m})" for t, m in sorted(types.items())) or "none"
        for topic in (self.image_topic, self.odom_topic):
            if topic not in types:
                raise DatasetError(f"rosbag2 {bag} has no topic {topic}; its topics: {listing}")
        expected = [(self.image_topic, IMAGE_TYPES), (self.odom_topic, (ODOM_TYPE,)),
                    (self.route_topic, (ROUTE_TYPE,)), (self.imu_topic, (IMU_TYPE,))]
        for name, allowed in expected:
            if name is not None and name in types and types[name] not in allowed:
                raise DatasetError(f"rosbag2 {bag}: topic {name} is {types[name]}, expected {' or '.join(allowed)}")
        return types

    def __len__(self) -> int:
        return sum(len(self._scan(bag).keyframes) for bag in self.bags)

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "path": str(self.path), "bags": [b.name for b in self.bags],
                "topics": {"image": self.image_topic, "odom": self.odom_topic, "route": self.route_topic,
                           "imu": self.imu_topic},
                "rate_hz": self.rate_hz, "future_times_s": list(self.future_times_s), "frame": "ego",
                "samples": len(self)}

    def __iter__(self) -> Iterator[EvalSample | SampleFailure]:
        for bag in self.bags:
            yield from self._bag_items(bag)

    # ---- first pass: motion, IMU, route commands and which images are keyframes ------------------

    def _scan(self, bag: Path) -> _BagScan:
        if bag not in self._scans:
            self._scans[bag] = self._read_scan(bag)
        return self._scans[bag]

    def _read_scan(self, bag: Path) -> _BagScan:
        types = self._types[bag]
        odom: list[tuple[int, float, float, float, float]] = []
        imu: list[tuple[int, float]] = []
        route: list[tuple[int, str]] = []
        image_ns: list[int] = []
        use_imu = self.imu_topic is not None and self.imu_topic in types
        topics = {self.odom_topic, self.image_topic, *([self.imu_topic] if use_imu else []),
                  *([self.route_topic] if self.route_topic in types else [])}
        with open_bag(bag) as reader:
            for conn, log_ns, raw in reader.messages([c for c in reader.connections if c.topic in topics]):
                msg = reader.deserialize(raw, conn.msgtype)
                if conn.topic == self.odom_topic:
                    pose, q = msg.pose.pose.position, msg.pose.pose.orientation
                    yaw = quaternion_yaw((q.w, q.x, q.y, q.z))
                    odom.append((_stamp_ns(msg), pose.x, pose.y, yaw, msg.twist.twist.linear.x))
                elif conn.topic == self.image_topic:
                    image_ns.append(_stamp_ns(msg))
                elif conn.topic == self.imu_topic:
                    imu.append((_stamp_ns(msg), msg.linear_acceleration.x))
                elif (command := str(msg.data).strip().lower()) in ROUTE_COMMANDS:
                    route.append((log_ns, command))
        track = OdomTrack.from_rows(odom)
        keyframes = select_keyframes(image_ns, track, HISTORY_NS, round(1e9 / self.rate_hz))
        imu_ns, imu_accel = (np.array([r[0] for r in sorted(imu)], dtype=np.int64),
                             np.array([r[1] for r in sorted(imu)])) if imu else (None, None)
        route.sort(key=lambda r: r[0])
        return _BagScan(odom=track, imu_ns=imu_ns, imu_accel=imu_accel,
                        route_ns=np.array([r[0] for r in route], dtype=np.int64) if route else None,
                        route=tuple(r[1] for r in route), keyframes={i: image_ns[i] for i in keyframes})

    # ---- second pass: the keyframes' images, one sample each -------------------------------------

    def _bag_items(self, bag: Path) -> Iterator[EvalSample | SampleFailure]:
        from rosbags.highlevel import AnyReaderError

        scan = self._scan(bag)
        if not scan.keyframes:
            return
        with open_bag(bag) as reader:
            conns = [c for c in reader.connections if c.topic == self.image_topic]
            for index, (conn, _, raw) in enumerate(reader.messages(conns)):
                stamp = scan.keyframes.get(index)
                if stamp is None:
                    continue
                sample_id = f"mcap/{bag.name}/{stamp}"
                try:
                    image = _image_of(reader.deserialize(raw, conn.msgtype))
                    yield self._sample(bag, scan, stamp, image)
                except (AnyReaderError, ValueError) as exc:  # broken message, non-finite odometry
                    yield SampleFailure(sample_id, self.name, bag.name,
                                        f"rosbag2 {bag}: {self.image_topic} at {stamp} ns: {exc}")

    def _sample(self, bag: Path, scan: _BagScan, stamp: int, image: _Image) -> EvalSample:
        odom = scan.odom
        x0, y0, yaw0, speed = odom.at(stamp)
        origin = np.array([x0, y0])
        past = to_ego_frame(odom.xy_at([stamp + round(t * 1e9) for t in PAST_TIMES_S]), origin, yaw0)
        future_ns = [stamp + round(t * 1e9) for t in self.future_times_s]
        valid = np.array([t <= odom.last_ns for t in future_ns])
        future_xy = to_ego_frame(odom.xy_at(future_ns), origin, yaw0)
        last_valid = future_xy[valid][-1] if valid.any() else np.zeros(2)
        future_xy[~valid] = last_valid
        future = Trajectory(times_s=np.array(self.future_times_s), xy=future_xy, valid=valid)
        extra: dict[str, Any] = {"bag": bag.name}
        accel = nearest_value(scan.imu_ns, scan.imu_accel, stamp, IMU_MAX_GAP_NS)
        if accel is not None:
            extra["accel_from"] = "imu"
        else:
            accel = (speed - odom.at(stamp - round(ACCEL_WINDOW_S * 1e9))[3]) / ACCEL_WINDOW_S
            extra["accel_from"] = "speed_difference"
        command = latest_at_or_before(scan.route_ns, scan.route, stamp)
        if command is not None:
            extra["route_command_from"] = "topic"
        else:
            command = route_command_from_future(future_xy, valid)
            extra["route_command_from"] = "gt_future"
        sample_id = f"mcap/{bag.name}/{stamp}"
        return EvalSample(
            sample_id=sample_id, source=self.name, scene=bag.name, timestamp_us=stamp // 1000,
            ego=EgoState(past_waypoints=past, speed_mps=speed, accel_mps2=float(accel)), route_command=command,
            load_images=_image_loader(image, f"rosbag2 {bag}: {self.image_topic} at {stamp} ns"),
            future=future, agents=None, image_names=(self.image_topic,), frame="ego", extra=extra)


def _image_of(msg: Any) -> _Image:
    data = bytes(np.asarray(msg.data, dtype=np.uint8).tobytes())
    if hasattr(msg, "encoding"):  # sensor_msgs/Image
        return _Image(data, (str(msg.encoding), int(msg.height), int(msg.width), int(msg.step)))
    return _Image(data, None)


def _image_loader(image: _Image, what: str) -> Callable[[], list[ImageArray]]:
    def load() -> list[ImageArray]:
        if image.raw is None:
            return [decode_image(image.data, what)]
        encoding, height, width, step = image.raw
        return [decode_raw(image.data, encoding, height, width, step, what)]

    return load

