"""Record the planner's outputs and the odometry into a rosbag2 MCAP, so a ROS run can be scored offline.

Subscribes, as serialized bytes, to the planner's path (``nav_msgs/Path``), plan JSON (``std_msgs/String``)
and diagnostics (``diagnostic_msgs/DiagnosticArray``) topics and to the odometry (``nav_msgs/Odometry``);
the topic names default to the planner's own defaults (:class:`~blockpilot.ros_nodes.params.PlannerParams`)
and an empty name leaves that topic out. Messages are written with ``rosbags`` in CDR as received,
stamped with the node clock at reception (the sim clock under ``use_sim_time``).

The bag is written into a hidden sibling directory ``.<name>.partial-XXXX/bag`` and renamed to ``out``
only when the recorder closes cleanly (end of ``--duration``, SIGINT, SIGTERM). A recorder that is
killed leaves the partial directory behind and nothing at ``out``: a bag at ``out`` is always complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..atomic_io import replace_dir, staging_dir
from .params import PlannerParams
from .score import BagError

NODE_NAME = "blockpilot_recorder"
BAG_VERSION: Final = 8  # rosbag2 metadata version, as the sim writer
# parameter name -> message type; the default topic names are the planner's.
RECORDED_TYPES = {
    "path_topic": "nav_msgs/msg/Path",
    "plan_json_topic": "std_msgs/msg/String",
    "diagnostics_topic": "diagnostic_msgs/msg/DiagnosticArray",
    "odometry_topic": "nav_msgs/msg/Odometry",
}


class RecorderError(BagError):
    """The recorder cannot start or finish: ``out`` exists, bad options, or the bag cannot be written."""


def default_topics() -> dict[str, str]:
    defaults = PlannerParams()
    return {name: str(getattr(defaults, name)) for name in RECORDED_TYPES}


class RecorderNode(Node):
    """Writes the recorded topics to ``out`` (see the module docstring); call :meth:`close` to finish.

    ROS parameters: ``out``, ``path_topic``, ``plan_json_topic``, ``diagnostics_topic``, ``odometry_topic``,
    ``reliable`` (subscribe reliably; False matches best-effort publishers too) and ``qos_depth``."""

    def __init__(self, out: str | Path | None = None, topics: dict[str, str] | None = None, *,
                 reliable: bool = True, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        from .replay_node import message_class

        self.declare_parameter("out", str(out or ""))
        chosen = {**default_topics(), **{k: v for k, v in (topics or {}).items() if v is not None}}
        for name, topic in chosen.items():
            self.declare_parameter(name, topic)
        self.declare_parameter("reliable", reliable)
        self.declare_parameter("qos_depth", 100)
        out_value = str(self.get_parameter("out").value)
        if not out_value:
            raise RecorderError("no output bag given (parameter 'out')")
        self.out = Path(out_value).absolute()
        if self.out.exists():
            raise RecorderError(f"{self.out} exists already; the recorder never overwrites a bag")
        self.topics = {name: str(self.get_parameter(name).value) for name in RECORDED_TYPES}
        self.topics = {name: topic for name, topic in self.topics.items() if topic}
        if len(set(self.topics.values())) != len(self.topics):
            raise RecorderError(f"two recorded topics share a name: {self.topics}")
        depth = int(self.get_parameter("qos_depth").value)
        if depth < 1:
            raise RecorderError(f"qos_depth must be at least 1, got {depth}")

        self._partial = staging_dir(self.out)
        store = get_typestore(Stores.ROS2_HUMBLE)
        self._writer = Writer(self._partial / "bag", version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        self._writer.set_custom_data("blockpilot.recorder", "true")
        self._writer.open()
        self._closed = False
        self.counts: dict[str, int] = {}
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE,
                         reliability=ReliabilityPolicy.RELIABLE if self.get_parameter("reliable").value
                         else ReliabilityPolicy.BEST_EFFORT)
        for name, topic in self.topics.items():
            msgtype = RECORDED_TYPES[name]
            conn = self._writer.add_connection(topic, msgtype, typestore=store)
            self.counts[topic] = 0
            self.create_subscription(message_class(msgtype, topic), topic,
                                     lambda raw, conn=conn, topic=topic: self._write(conn, topic, raw), qos, raw=True)

    @property
    def partial_dir(self) -> Path:
        """Where the bag is written until :meth:`close` moves it to ``out``."""
        return self._partial

    def _write(self, conn: Any, topic: str, raw: bytes) -> None:
        if self._closed:
            return
        self._writer.write(conn, self.get_clock().now().nanoseconds, raw)
        self.counts[topic] += 1

    def close(self) -> Path:
        """Finish the bag and move it to ``out``; returns ``out``. Idempotent."""
        if self._closed:
            return self.out
        self._closed = True
        self._writer.close()
        try:
            replace_dir(self._partial / "bag", self.out, overwrite=False)  # never over one made meanwhile
        except OSError as exc:
            raise RecorderError(f"the finished bag stays at {self._partial / 'bag'}: cannot move it to "
                                f"{self.out}: {exc}") from None
        shutil.rmtree(self._partial, ignore_errors=True)
        self.get_logger().info(f"recorded {self.out}: {json.dumps(self.counts)}")
        return self.out


def drain(executor: Any, node: RecorderNode, quiet_s: float = 0.2, limit_s: float = 2.0) -> None:
    """Handle the messages already delivered to the subscriptions: spin until none came for ``quiet_s``."""
    end = time.monotonic() + limit_s
    last_change, seen = time.monotonic(), sum(node.counts.values())
    while time.monotonic() - last_change < quiet_s and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.02)
        if (now := sum(node.counts.values())) != seen:
            last_change, seen = time.monotonic(), now


def run(args: argparse.Namespace, ros_args: Sequence[str] = ()) -> dict[str, Any]:
    """Record until ``args.duration`` passes or SIGINT / SIGTERM arrives; then drain what was already
    delivered and close the bag. The signals only set a flag, so the context stays up for the drain."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    if not args.duration >= 0:
        raise RecorderError(f"duration must be >= 0, got {args.duration}")
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    rclpy.init(args=["recorder_node", *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = RecorderNode(args.out, {name: getattr(args, name) for name in RECORDED_TYPES},
                            reliable=not args.best_effort)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        end = time.monotonic() + args.duration if args.duration else None
        try:
            while not stop.is_set() and rclpy.ok() and (end is None or time.monotonic() < end):
                executor.spin_once(timeout_sec=0.1)
            drain(executor, node)
        finally:
            out = node.close()
            node.destroy_node()
        return {"out": str(out), "counts": node.counts}
    finally:
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import add_record_arguments, node_main

    return node_main(argv, "recorder_node", "Record planner outputs to a rosbag2 MCAP.", add_record_arguments, run,
                     RecorderError)


if __name__ == "__main__":
    raise SystemExit(main())
