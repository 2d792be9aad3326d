"""Play a rosbag2 recording back onto its topics, the way ``ros2 bag play`` does, without rosbag2_py.

A bag is a rosbag2 directory (``metadata.yaml`` plus its storage files) or a bare ``.mcap`` file, read
with ``rosbags``. Each message goes out as the CDR bytes stored in the bag (rclpy publishes
serialized bytes as they are), on a publisher made from the connection's message type, so a replayed
message is byte-identical to the recorded one.

Timing follows the bag's receive stamps: a message recorded ``d`` seconds after the first goes out
``d / rate`` seconds after playback starts. ``rate = 0`` publishes as fast as possible (for tests and
for filling a queue; subscribers with a shallow queue will then drop messages). Publishers are reliable
and volatile with a deep queue, so they match best-effort and reliable subscribers alike.

With ``publish_clock`` each message is preceded by a ``rosgraph_msgs/Clock`` holding its bag stamp,
for nodes that run with ``use_sim_time``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from .score import BagError, resolve_bag

NODE_NAME = "blockpilot_replay"
_POLL_S = 0.05  # longest sleep between checks that the context is still up


class ReplayError(BagError):
    """A bag that cannot be replayed: missing, not a bag, several bags, or not CDR."""


class MessageTypeError(ReplayError):
    """A bag topic whose message type has no Python message class installed here."""

    def __init__(self, topic: str, msgtype: str, reason: str) -> None:
        super().__init__(f"topic {topic}: message type {msgtype} is not installed ({reason}); "
                         f"install its ROS 2 interface package or leave the topic out with --topics")
        self.topic, self.msgtype = topic, msgtype


@dataclass(frozen=True)
class ReplayOptions:
    """How to play a bag. ``loops = 0`` repeats until shutdown; ``topics`` empty means every topic;
    ``remap`` pairs (bag topic, published topic)."""

    rate: float = 1.0
    loops: int = 1
    topics: tuple[str, ...] = ()
    remap: tuple[tuple[str, str], ...] = ()
    publish_clock: bool = False
    wait_for_subscribers: int = 0
    wait_timeout_s: float = 30.0
    delay_s: float = 0.0
    qos_depth: int = 100

    def __post_init__(self) -> None:
        if not self.rate >= 0:
            raise ReplayError(f"rate must be >= 0 (0: as fast as possible), got {self.rate}")
        if self.loops < 0:
            raise ReplayError(f"loops must be >= 0 (0: forever), got {self.loops}")
        if self.wait_for_subscribers < 0 or not self.wait_timeout_s > 0 or not self.delay_s >= 0:
            raise ReplayError("wait_for_subscribers and delay_s must be >= 0 and wait_timeout_s > 0")
        if self.qos_depth < 1:
            raise ReplayError(f"qos_depth must be >= 1, got {self.qos_depth}")
        sources = [a for a, _ in self.remap]
        if len(set(sources)) != len(sources):
            raise ReplayError(f"a topic is remapped twice: {sources}")


def parse_remaps(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["/odom:=/ego/odom", ...]`` as pairs; ReplayError for an item without ``:=``."""
    pairs = []
    for item in items:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ReplayError(f"a remap is FROM:=TO, got {item!r}")
        pairs.append((src, dst))
    return tuple(pairs)


def _resolve(path: str | Path) -> Path:
    try:
        return resolve_bag(path)
    except BagError as exc:
        raise ReplayError(str(exc)) from None


def message_class(msgtype: str, topic: str) -> type[Any]:
    """The rclpy message class of ``pkg/msg/Name``; MessageTypeError naming the topic if absent."""
    parts = msgtype.split("/")
    if len(parts) != 3 or not parts[0] or parts[1] != "msg" or not parts[2]:
        raise MessageTypeError(topic, msgtype, "not a pkg/msg/Name type")
    try:
        cls = getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])
    except (ImportError, AttributeError) as exc:
        raise MessageTypeError(topic, msgtype, str(exc)) from None
    return cls


def playback_topics(bag: Path, options: ReplayOptions) -> dict[str, tuple[str, str, type[Any]]]:
    """Bag topic -> (published topic, message type, message class) of what ``options`` plays, checked
    without ROS: ReplayError for a missing topic, a topic with two types or not in CDR, MessageTypeError
    for a type not installed here."""
    reader = _bag_reader(bag)
    try:
        types: dict[str, str] = {}
        for conn in reader.connections:
            if types.setdefault(conn.topic, conn.msgtype) != conn.msgtype:
                raise ReplayError(f"{bag}: topic {conn.topic} holds two types, {types[conn.topic]} and {conn.msgtype}")
            fmt = getattr(conn.ext, "serialization_format", "cdr")
            if fmt != "cdr":
                raise ReplayError(f"{bag}: topic {conn.topic} is serialized as {fmt}, not cdr")
    finally:
        reader.close()
    wanted = set(options.topics) or set(types)
    missing = sorted(wanted - set(types))
    if missing:
        raise ReplayError(f"{bag} has no topic {', '.join(missing)}; its topics: {', '.join(sorted(types))}")
    remap = dict(options.remap)
    return {topic: (remap.get(topic, topic), types[topic], message_class(types[topic], topic))
            for topic in sorted(wanted)}


@dataclass
class ReplayReport:
    """Messages published per (published) topic, loops finished, and whether playback was cut short."""

    bag: str
    counts: dict[str, int] = field(default_factory=dict)
    loops_done: int = 0
    interrupted: bool = False
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"bag": self.bag, "counts": dict(sorted(self.counts.items())), "loops_done": self.loops_done,
                "interrupted": self.interrupted, "wall_s": round(self.wall_s, 3)}


def _bag_reader(bag: Path) -> Any:
    from rosbags.rosbag2 import Reader, ReaderError

    reader = Reader(bag)
    try:
        reader.open()
    except (ReaderError, OSError) as exc:
        raise ReplayError(f"rosbag2 {bag} cannot be read: {exc}") from None
    return reader


def sleep_until(node: Node, deadline: float) -> bool:
    """Sleep until the monotonic ``deadline``; False if the node's context went down meanwhile."""
    while (left := deadline - time.monotonic()) > 0:
        if not node.context.ok():
            return False
        time.sleep(min(left, _POLL_S))
    return bool(node.context.ok())


def wait_for_subscribers(node: Node, publishers: dict[str, Any], need: int, timeout_s: float, delay_s: float) -> None:
    """Block until every publisher (by topic) has ``need`` matched subscriptions, then ``delay_s`` more;
    :class:`ReplayError` naming the topics still short after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while need and node.context.ok():
        short = [topic for topic, pub in publishers.items() if pub.get_subscription_count() < need]
        if not short:
            break
        if time.monotonic() > deadline:
            raise ReplayError(f"after {timeout_s:g} s these topics have fewer than {need} subscribers: "
                              f"{', '.join(short)}")
        time.sleep(_POLL_S)
    sleep_until(node, time.monotonic() + delay_s)


class ReplayNode(Node):
    """Publishes one bag's messages as recorded. ROS parameters (``bag``, ``rate``, ``loops``,
    ``topics``, ``remap``, ``publish_clock``, ``wait_for_subscribers``, ``wait_timeout_s``, ``delay_s``,
    ``qos_depth``) take their defaults from the arguments; call :meth:`play`."""

    def __init__(self, bag: str | Path | None = None, options: ReplayOptions | None = None, *,
                 node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        opts = options or ReplayOptions()
        self.declare_parameter("bag", str(bag or ""))
        for name in ("rate", "loops", "publish_clock", "wait_for_subscribers", "wait_timeout_s", "delay_s",
                     "qos_depth"):
            self.declare_parameter(name, getattr(opts, name))
        self.declare_parameter("topics", Parameter.Type.STRING_ARRAY)
        self.declare_parameter("remap", Parameter.Type.STRING_ARRAY)
        param = self.get_parameter
        topics = self._string_list("topics") or list(opts.topics)
        remaps = self._string_list("remap")
        self.options = ReplayOptions(
            rate=float(param("rate").value), loops=int(param("loops").value), topics=tuple(topics),
            remap=parse_remaps(remaps) if remaps else opts.remap, publish_clock=bool(param("publish_clock").value),
            wait_for_subscribers=int(param("wait_for_subscribers").value),
            wait_timeout_s=float(param("wait_timeout_s").value), delay_s=float(param("delay_s").value),
            qos_depth=int(param("qos_depth").value))
        if not param("bag").value:
            raise ReplayError("no bag given (parameter 'bag')")
        self.bag = _resolve(str(param("bag").value))
        self._out_topic: dict[str, str] = {}
        self._topic_pubs: dict[str, Any] = {}
        self._clock_pub: Any = None
        self._create_publishers()
        self.report = ReplayReport(bag=str(self.bag), counts=dict.fromkeys(self._out_topic.values(), 0))

    def _string_list(self, name: str) -> list[str]:
        value = self.get_parameter_or(name, Parameter(name, Parameter.Type.STRING_ARRAY, [])).value
        return [str(v) for v in value or [] if str(v)]

    def _create_publishers(self) -> None:
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.options.qos_depth,
                         reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        for topic, (out_topic, _, cls) in playback_topics(self.bag, self.options).items():
            self._out_topic[topic] = out_topic
            self._topic_pubs[topic] = self.create_publisher(cls, out_topic, qos)
        if self.options.publish_clock:
            from rosgraph_msgs.msg import Clock

            self._clock_pub = self.create_publisher(Clock, "/clock", 10)

    def _running(self) -> bool:
        return bool(self.context.ok())

    def _sleep_until(self, deadline: float) -> bool:
        return sleep_until(self, deadline)

    def wait_for_subscribers(self) -> None:
        """Block until every publisher has ``wait_for_subscribers`` matched subscriptions, then ``delay_s``."""
        o = self.options
        wait_for_subscribers(self, {self._out_topic[t]: p for t, p in self._topic_pubs.items()},
                             o.wait_for_subscribers, o.wait_timeout_s, o.delay_s)

    def play(self) -> ReplayReport:
        """Publish the bag ``loops`` times (0: forever) or until shutdown; the report is also ``self.report``."""
        start = time.monotonic()
        self.wait_for_subscribers()
        try:
            while self._running() and (self.options.loops == 0 or self.report.loops_done < self.options.loops):
                if not self._play_once():
                    self.report.interrupted = True
                    break
                self.report.loops_done += 1
            else:
                self.report.interrupted = not self._running()
        finally:
            self.report.wall_s = time.monotonic() - start
        if self._running():  # after a signal the context is down and rosout with it
            self.get_logger().info(f"replay of {self.bag}: {json.dumps(self.report.to_dict())}")
        return self.report

    def _play_once(self) -> bool:
        reader = _bag_reader(self.bag)
        try:
            conns = [c for c in reader.connections if c.topic in self._topic_pubs]
            t0_wall, t0_bag = time.monotonic(), None
            for conn, stamp, raw in reader.messages(conns):
                t0_bag = stamp if t0_bag is None else t0_bag
                if self.options.rate > 0:
                    if not self._sleep_until(t0_wall + (stamp - t0_bag) / 1e9 / self.options.rate):
                        return False
                elif not self._running():
                    return False
                if self._clock_pub is not None:
                    self._publish_clock(stamp)
                self._topic_pubs[conn.topic].publish(bytes(raw))
                self.report.counts[self._out_topic[conn.topic]] += 1
        finally:
            reader.close()
        return True

    def _publish_clock(self, stamp_ns: int) -> None:
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock

        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        self._clock_pub.publish(Clock(clock=Time(sec=sec, nanosec=nanosec)))


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    loops = args.loops if args.loops is not None else (0 if args.loop else 1)
    return ReplayOptions(rate=args.rate, loops=loops, topics=tuple(args.topics), remap=parse_remaps(args.remap),
                         publish_clock=args.clock, wait_for_subscribers=args.wait_for_subscribers,
                         wait_timeout_s=args.wait_timeout, delay_s=args.delay)


def run(args: argparse.Namespace, ros_args: Sequence[str] = ()) -> ReplayReport:
    """Init rclpy, play, shut down; Ctrl-C ends playback early and still returns the counts so far."""
    options = options_from_args(args)
    playback_topics(_resolve(args.bag), options)  # a bad bag or type fails before any DDS traffic
    report: ReplayReport = play_with_rclpy("replay_node", lambda: ReplayNode(args.bag, options), ros_args)
    return report


def play_with_rclpy(program: str, make_node: Callable[[], Any], ros_args: Sequence[str] = ()) -> Any:
    """Init rclpy, build a player node (``play()`` returns its ``report``), play, shut down; Ctrl-C ends playback
    early and still returns the report so far."""
    import rclpy

    rclpy.init(args=[program, *ros_args])
    try:
        node = make_node()
        try:
            return node.play()
        except KeyboardInterrupt:
            node.report.interrupted = True
            return node.report
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import add_replay_arguments, node_main

    return node_main(argv, "replay_node", "Play a rosbag2 MCAP onto its topics.", add_replay_arguments,
                     lambda args, ros_args: run(args, ros_args).to_dict(), ReplayError)


if __name__ == "__main__":
    raise SystemExit(main())
