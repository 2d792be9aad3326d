"""``blockpilot ros``: run the planner, arm, replay, LeRobot replay or recorder node, or score a recorded run.

The argument definitions live here, free of ROS imports, so that ``blockpilot --help`` works without
rclpy; the node modules' own ``main`` functions (the colcon entry points) use the same definitions.
Arguments after ``--ros-args`` go to rclpy unchanged (``-p name:=value``, ``-r from:=to``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..cli_common import (
    UserError,
    add_json_option,
    emit,
    existing_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    writable_target,
)

PARAMS_RESOURCE = ("config", "planner.yaml")
LEROBOT_IMAGE_TOPICS = ("/camera/scene/image_raw", "/camera/wrist/image_raw")  # third-person, wrist
RECORDED_TOPICS = ("path_topic", "plan_json_topic", "diagnostics_topic", "odometry_topic")


def default_params_file() -> Path:
    """The planner params YAML shipped inside the package (``ros/blockpilot_ros/config/planner.yaml`` too)."""
    return Path(str(resources.files("blockpilot.ros_nodes").joinpath(*PARAMS_RESOURCE)))


def add_ros_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=None,
                        help="everything after this goes to rclpy (-p name:=value, -r from:=to, ...)")


def ros_args_of(args: argparse.Namespace) -> list[str]:
    extra = getattr(args, "ros_args", None)
    return [] if extra is None else ["--ros-args", *extra]


def node_main(argv: Sequence[str] | None, prog: str, description: str,
              add_node_arguments: Callable[[argparse.ArgumentParser], None],
              run_node: Callable[[argparse.Namespace, list[str]], dict[str, Any]], error: type[Exception]) -> int:
    """A node module's own ``main`` (its colcon entry point): parse its flags (``argv``, default ``sys.argv[1:]``),
    run it with the ``--ros-args`` for rclpy and print its result as JSON; ``error`` is one line on stderr, exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_node_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run_node(args, ros_args_of(args))
    except error as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="rosbag2 directory (metadata.yaml + .mcap) or an .mcap file")
    parser.add_argument("--rate", type=non_negative_float, default=1.0, help="playback speed; 0: as fast as possible")
    parser.add_argument("--loop", action="store_true", help="repeat until interrupted")
    parser.add_argument("--loops", type=positive_int, default=None, help="play this many times (overrides --loop)")
    parser.add_argument("--topics", nargs="+", default=(), help="play only these bag topics")
    parser.add_argument("--remap", nargs="+", default=(), help="FROM:=TO renames of bag topics")
    parser.add_argument("--clock", action="store_true", help="also publish /clock with the bag stamps")
    parser.add_argument("--wait-for-subscribers", type=non_negative_int, default=0,
                        help="first wait until every played topic has this many subscribers")
    parser.add_argument("--wait-timeout", type=non_negative_float, default=30.0,
                        help="seconds to wait for subscribers")
    parser.add_argument("--delay", type=non_negative_float, default=0.0,
                        help="seconds to wait before the first message")
    add_ros_args(parser)


def add_lerobot_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataroot", help="LeRobot dataset directory (meta/info.json, data/, ...)")
    parser.add_argument("--episode", type=non_negative_int, default=0, help="episode index to play (default 0)")
    parser.add_argument("--rate", type=non_negative_float, default=1.0,
                        help="playback speed relative to the dataset's fps; 0: as fast as possible")
    parser.add_argument("--cameras", nargs="+", default=(), help="dataset cameras to play, in topic order "
                                                                 "(default: all, in the dataset's order)")
    parser.add_argument("--image-topics", nargs="+", default=LEROBOT_IMAGE_TOPICS,
                        help="sensor_msgs/Image topic of each camera, in order (default: third-person, wrist)")
    parser.add_argument("--joint-state-topic", default="/joint_states")
    parser.add_argument("--instruction-topic", default="/instruction")
    parser.add_argument("--instruction", default="", help="publish this instead of the episode's task")
    parser.add_argument("--ee-pose-topic", default="", help="also publish observation.ee_pose as PoseStamped here")
    parser.add_argument("--wait-for-subscribers", type=non_negative_int, default=0,
                        help="first wait until every topic has this many subscribers")
    parser.add_argument("--wait-timeout", type=non_negative_float, default=30.0, help="seconds to wait for them")
    parser.add_argument("--delay", type=non_negative_float, default=0.0,
                        help="seconds to wait before the first message")
    add_ros_args(parser)


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="rosbag2 directory to create (must not exist)")
    parser.add_argument("--duration", type=non_negative_float, default=0.0,
                        help="stop after this many seconds (0: until Ctrl-C)")
    for name in RECORDED_TOPICS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help="topic to record (default: the planner's; '' leaves it out)")
    parser.add_argument("--best-effort", action="store_true", help="subscribe best-effort (matches any publisher)")
    add_ros_args(parser)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recorded", required=True, help="bag written by the recorder")
    parser.add_argument("--source", required=True, help="bag that was replayed (its odometry is the truth)")
    parser.add_argument("--path-topic", default=None, help="nav_msgs/Path topic (default: the planner's)")
    parser.add_argument("--odometry-topic", default="/odom", help="odometry topic of the source bag")
    parser.add_argument("--plan-json-topic", default=None, help="plan JSON topic (default: the planner's)")
    parser.add_argument("--waypoint-rate-hz", type=positive_float, default=2.0,
                        help="waypoints per second of the planner's schema (2 for driving-nuscenes)")
    add_json_option(parser, file_help="also write the full summary here (was --json PATH)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ros_command", metavar="NODE", required=True)
    planner = sub.add_parser("planner", help="the planner lifecycle node (configures and activates at start)")
    planner.add_argument("--params", default=None,
                         help="ROS 2 params file (default: the shipped planner.yaml, see `ros params`)")
    planner.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=True,
                         help="configure and activate at start (default on)")
    add_ros_args(planner)
    arm = sub.add_parser("arm", help="the arm lifecycle node (images, joint states, instruction in; joint "
                                     "trajectory or ee poses out)")
    arm.add_argument("--params", required=True, help="ROS 2 params file with a blockpilot_arm section "
                                                     "(checkpoint or bundle; see blockpilot.ros_nodes.arm_params)")
    arm.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=True,
                     help="configure and activate at start (default on)")
    add_ros_args(arm)
    add_replay_arguments(sub.add_parser("replay", help="play a rosbag2 MCAP onto its topics"))
    add_lerobot_replay_arguments(sub.add_parser("lerobot-replay", help="play a LeRobot dataset episode as images, "
                                                                       "joint states and instruction"))
    add_record_arguments(sub.add_parser("record", help="record planner outputs and odometry to a rosbag2 MCAP"))
    add_score_arguments(sub.add_parser("score", help="L2 of recorded paths against a source bag's odometry"))
    sub.add_parser("params", help="print the path of the shipped planner params YAML")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse before any node starts: the files each action reads or writes, named by their flags."""
    command = args.ros_command
    if command in ("planner", "arm") and args.params:
        existing_path("--params", args.params)
    elif command == "lerobot-replay":
        existing_path("DATAROOT", args.dataroot)
    elif command == "replay":
        existing_path("BAG", args.bag)
    elif command == "record":
        if Path(args.out).exists():
            raise UserError(f"--out {args.out}: already exists; the recorder creates a new rosbag2 directory")
        writable_target("--out", args.out, directory=True)
    elif command == "score":
        existing_path("--recorded", args.recorded)
        existing_path("--source", args.source)
        if args.json_out:
            writable_target("--json-out", args.json_out)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``blockpilot ros NODE``. Raises :class:`~blockpilot.ros_nodes.score.BagError` (replay,
    score) or :class:`~blockpilot.ros_nodes.recorder_node.RecorderError` for the caller to report."""
    check_arguments(args)
    command = args.ros_command
    if command == "params":
        print(default_params_file())
        return 0
    if command == "planner":
        from .planner_node import main as planner_main

        params = args.params or str(default_params_file())
        return planner_main(["--params", params, "--autostart" if args.autostart else "--no-autostart",
                             *ros_args_of(args)])
    if command == "arm":
        from .arm_node import main as arm_main

        return arm_main(["--params", args.params, "--autostart" if args.autostart else "--no-autostart",
                         *ros_args_of(args)])
    result: dict[str, Any]
    if command == "lerobot-replay":
        from .lerobot_replay import run as lerobot_replay

        result = lerobot_replay(args, ros_args_of(args)).to_dict()
    elif command == "replay":
        from .replay_node import run as replay

        result = replay(args, ros_args_of(args)).to_dict()
    elif command == "record":
        from .recorder_node import run as record

        result = record(args, ros_args_of(args))
    else:
        from .score import score_run

        result = score_run(args.recorded, args.source, path_topic=args.path_topic,
                           odometry_topic=args.odometry_topic, plan_json_topic=args.plan_json_topic,
                           waypoint_rate_hz=args.waypoint_rate_hz)
        brief = {k: v for k, v in result.items() if k not in ("model", "cv")}  # the full breakdown: --json
        emit(args, result, json.dumps(brief, indent=2))
        return 0
    print(json.dumps(result, indent=2))
    return 0
