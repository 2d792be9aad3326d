"""Play one episode of a LeRobot dataset (v3.0, read with LeRobot's own library through
:func:`~blockpilot.eval.robot_eval.open_robot_source`) into ROS 2, as an arm would publish it: per frame a
``sensor_msgs/JointState`` (the dataset's ``observation.state`` under its joint names), optionally the end-effector
pose as ``geometry_msgs/PoseStamped``, then each camera as ``sensor_msgs/Image`` (``rgb8``; the wrist camera before
the third-person camera that triggers the arm node's plan), all with one stamp (the wall clock at publishing);
and the episode's instruction as ``std_msgs/String`` once before the first frame.

Frames go out at the dataset's fps times ``rate`` (0: as fast as possible); the whole episode is decoded before the
first message, so decoding never delays playback. Publishers are reliable and volatile, so they match best-effort
and reliable subscribers alike.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..errors import BlockpilotError
from .replay_node import ReplayError, play_with_rclpy, sleep_until, wait_for_subscribers

NODE_NAME = "blockpilot_lerobot_replay"
STATE_FEATURE = "observation.state"


class LeRobotReplayError(ReplayError):
    """A dataset or episode that cannot be replayed, or flags that do not fit it; the message names which."""


@dataclass(frozen=True)
class Episode:
    """One decoded episode: per frame the camera images (by camera name), the joint state and the ee pose."""

    dataroot: str
    index: int
    fps: float
    instruction: str
    joint_names: tuple[str, ...]
    cameras: tuple[str, ...]
    frames: tuple[Any, ...]  # RobotSample


def load_episode(dataroot: str, episode: int) -> Episode:
    """Episode ``episode`` of the LeRobot dataset at ``dataroot``, every frame decoded."""
    from ..eval.robot_eval import open_robot_source

    info = Path(dataroot) / "meta" / "info.json"
    try:  # checked first: LeRobot looks for an episode it does not have on the Hugging Face Hub
        total = int(json.loads(info.read_text(encoding="utf-8"))["total_episodes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LeRobotReplayError(f"DATAROOT {dataroot}: {info} has no readable total_episodes ({exc})") from None
    if not 0 <= episode < total:
        raise LeRobotReplayError(f"--episode {episode}: {dataroot} has {total} episode(s), 0..{total - 1}")
    try:
        source = open_robot_source(dataroot, chunk=1, episodes=[episode])
    except BlockpilotError as exc:
        raise LeRobotReplayError(f"DATAROOT {dataroot}: {exc}") from None
    frames = tuple(source)
    if not frames:
        raise LeRobotReplayError(f"--episode {episode}: no frame in {dataroot}")
    names = source.info["features"][STATE_FEATURE].get("names") or []
    if isinstance(names, dict):  # LeRobot also writes {"motors": [...]}
        names = next(iter(names.values()), [])
    if len(names) != len(frames[0].state):
        names = [f"joint_{i}" for i in range(len(frames[0].state))]
    return Episode(str(dataroot), episode, float(source.fps), frames[0].instruction, tuple(map(str, names)),
                   tuple(source.cameras), frames)


@dataclass
class LeRobotReplayReport:
    dataroot: str
    episode: int
    fps: float
    frames: int = 0
    instruction: str = ""
    topics: dict[str, int] = field(default_factory=dict)  # topic -> messages published
    duration_s: float = 0.0
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LeRobotReplayNode(Node):
    """Publishes an :class:`Episode`; ``image_topics[i]`` carries ``cameras[i]`` (default: every camera of the
    dataset, in its order). Call :meth:`play`."""

    def __init__(self, episode: Episode, args: argparse.Namespace, *, node_name: str = NODE_NAME) -> None:
        super().__init__(node_name)
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        self.episode, self.args = episode, args
        cameras = tuple(args.cameras or episode.cameras)
        unknown = sorted(set(cameras) - set(episode.cameras))
        if unknown:
            raise LeRobotReplayError(f"--cameras {', '.join(unknown)}: the dataset's cameras are "
                                     f"{', '.join(episode.cameras)}")
        topics = tuple(args.image_topics)
        if len(topics) < len(cameras):
            raise LeRobotReplayError(f"--image-topics: {len(topics)} topic(s) for the cameras {', '.join(cameras)}; "
                                     "give one per camera or choose cameras with --cameras")
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        self.camera_pubs = [(name, topic, self.create_publisher(Image, topic, qos))
                            for name, topic in zip(cameras, topics, strict=False)]
        self.joint_pub = self.create_publisher(JointState, args.joint_state_topic, qos)
        self.instruction_pub = self.create_publisher(String, args.instruction_topic, qos)
        self.ee_pub = self.create_publisher(PoseStamped, args.ee_pose_topic, qos) if args.ee_pose_topic else None
        self.instruction = args.instruction or episode.instruction
        self.report = LeRobotReplayReport(episode.dataroot, episode.index, episode.fps, instruction=self.instruction,
                                          topics={t: 0 for t in self.publishers_by_topic()})

    def publishers_by_topic(self) -> dict[str, Any]:
        pubs = {self.args.joint_state_topic: self.joint_pub, self.args.instruction_topic: self.instruction_pub,
                **{topic: pub for _, topic, pub in self.camera_pubs}}
        if self.ee_pub is not None:
            pubs[self.args.ee_pose_topic] = self.ee_pub
        return pubs

    def _publish(self, topic: str, pub: Any, msg: Any) -> None:
        pub.publish(msg)
        self.report.topics[topic] += 1

    def play(self) -> LeRobotReplayReport:
        from std_msgs.msg import String

        a = self.args
        wait_for_subscribers(self, self.publishers_by_topic(), a.wait_for_subscribers, a.wait_timeout, a.delay)
        self._publish(a.instruction_topic, self.instruction_pub, String(data=self.instruction))
        start = time.monotonic()
        period = 0.0 if a.rate == 0 else 1.0 / (self.episode.fps * a.rate)
        for k, sample in enumerate(self.episode.frames):
            if period and not sleep_until(self, start + k * period):
                self.report.interrupted = True
                break
            if not self.context.ok():
                self.report.interrupted = True
                break
            self._publish_frame(sample, time.time_ns())
            self.report.frames += 1
        self.report.duration_s = time.monotonic() - start
        return self.report

    def _publish_frame(self, sample: Any, stamp: int) -> None:
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Header

        from .conversions import time_msg

        header = Header(stamp=time_msg(stamp), frame_id="base_link")
        state = [float(v) for v in sample.state]
        self._publish(self.args.joint_state_topic, self.joint_pub,
                      JointState(header=header, name=list(self.episode.joint_names), position=state))
        if self.ee_pub is not None and sample.ee_pose is not None:
            pose = PoseStamped(header=Header(stamp=header.stamp, frame_id="world"))
            x, y, z, qw, qx, qy, qz = (float(v) for v in sample.ee_pose)
            pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = x, y, z
            o = pose.pose.orientation
            o.w, o.x, o.y, o.z = qw, qx, qy, qz
            self._publish(self.args.ee_pose_topic, self.ee_pub, pose)
        for name, topic, pub in reversed(self.camera_pubs):  # the first (third-person) camera goes out last
            image = sample.images[name]
            msg = Image(header=Header(stamp=header.stamp, frame_id=f"camera_{name}"), height=image.shape[0],
                        width=image.shape[1], encoding="rgb8", is_bigendian=0, step=image.shape[1] * 3,
                        data=image.tobytes())
            self._publish(topic, pub, msg)


def run(args: argparse.Namespace, ros_args: Sequence[str] = ()) -> LeRobotReplayReport:
    """Load the episode (a bad dataset fails before any DDS traffic), init rclpy, play, shut down."""
    episode = load_episode(args.dataroot, args.episode)
    report: LeRobotReplayReport = play_with_rclpy("lerobot_replay_node", lambda: LeRobotReplayNode(episode, args),
                                                  ros_args)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import add_lerobot_replay_arguments, node_main

    return node_main(argv, "lerobot_replay_node", "Play a LeRobot dataset episode into ROS 2 (images, joint "
                     "states, instruction).", add_lerobot_replay_arguments,
                     lambda args, ros_args: run(args, ros_args).to_dict(), ReplayError)


if __name__ == "__main__":
    raise SystemExit(main())
