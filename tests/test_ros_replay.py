"""The replay node with real rclpy on loopback: every message of a sim bag arrives in order with the
bag's bytes; topic filter, remap, loops and /clock; bad bags and uninstalled types fail before DDS."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from ros_harness import run_in_loopback
from sim_writer_fixtures import FRONT, make_scene, render

from blockpilot.ros_nodes.cli import add_replay_arguments
from blockpilot.ros_nodes.replay_node import MessageTypeError, ReplayError, ReplayOptions, run
from blockpilot.sim.writers.mcap_writer import write_rosbag2


def padded(raw: bytes) -> bytes:
    """DDS carries a serialized payload padded with zeros to a multiple of 4 bytes (rosbags writes
    it unpadded); the CDR bytes themselves travel unchanged."""
    return raw + b"\0" * (-len(raw) % 4)


def bag_messages(bag: Path) -> dict[str, list[bytes]]:
    from rosbags.rosbag2 import Reader

    out: dict[str, list[bytes]] = {}
    with Reader(bag) as reader:
        for conn, _, raw in reader.messages():
            out.setdefault(conn.topic, []).append(bytes(raw))
    return out


@pytest.fixture(scope="module")
def sim_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rosbag2(make_scene(7, 0.08, "turn left"), tmp_path_factory.mktemp("replay") / "left",
                         camera=FRONT, render=render, camera_rate_hz=10.0)


# ---- run inside the namespace -------------------------------------------------------------------


def receive_replay(bag: str, replay_args: list[str], listen: dict[str, str], expect: int) -> dict[str, Any]:
    """Subscribe (raw, keep all) to ``listen`` (topic -> type), run the replay node as a child process
    with ``replay_args`` and collect what arrives until the child has ended and ``expect`` messages came."""
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from ros_harness import child_process, python_module, spinning, wait_until

    from blockpilot.ros_nodes.replay_node import message_class

    rclpy.init()
    node = Node("replay_listener")
    got: dict[str, list[str]] = {t: [] for t in listen}
    qos = QoSProfile(history=HistoryPolicy.KEEP_ALL, depth=1, reliability=ReliabilityPolicy.RELIABLE)
    for topic, msgtype in listen.items():
        node.create_subscription(message_class(msgtype, topic), topic,
                                 lambda raw, topic=topic: got[topic].append(raw.hex()), qos, raw=True)
    with spinning(node), child_process(python_module("blockpilot.ros_nodes.replay_node", bag, *replay_args),
                                       name="replay") as child:
        rc = child.popen.wait(timeout=120)
        wait_until(lambda: sum(map(len, got.values())) >= expect, timeout_s=10)
        log = child.log()
    node.destroy_node()
    rclpy.shutdown()
    report = next((json.loads(line) for line in log.splitlines() if line.startswith('{"bag"')), None)
    return {"got": got, "rc": rc, "report": report, "log": log[-3000:]}


# ---- tests --------------------------------------------------------------------------------------


def test_replay_delivers_every_message_in_order_byte_identical(sim_bag: Path) -> None:
    expected = bag_messages(sim_bag)
    types = {"/camera/front/image_raw/compressed": "sensor_msgs/msg/CompressedImage",
             "/camera/front/camera_info": "sensor_msgs/msg/CameraInfo", "/odom": "nav_msgs/msg/Odometry",
             "/imu/data": "sensor_msgs/msg/Imu", "/route_command": "std_msgs/msg/String"}
    assert set(expected) == set(types)
    total = sum(map(len, expected.values()))
    result = run_in_loopback(receive_replay, bag=str(sim_bag), listen=types, expect=total,
                             replay_args=["--rate", "4", "--wait-for-subscribers", "1", "--delay", "0.5"])
    assert result["rc"] == 0, result["log"]
    report = result["report"]
    assert report["counts"] == {t: len(v) for t, v in expected.items()}
    assert report["loops_done"] == 1 and not report["interrupted"]
    assert report["wall_s"] >= 10.0 / 4 - 0.05  # the scene spans 10 s of bag time, played at 4x
    for topic, messages in expected.items():
        assert len(result["got"][topic]) == len(messages), topic
        assert [bytes.fromhex(h) for h in result["got"][topic]] == [padded(m) for m in messages], topic
    assert {len(v) for v in expected.values()} == {101, 11}  # 10 Hz camera and odometry, 1 Hz route


def test_replay_filter_remap_loops_and_clock(sim_bag: Path) -> None:
    expected = bag_messages(sim_bag)
    listen = {"/replay/odom": "nav_msgs/msg/Odometry", "/route_command": "std_msgs/msg/String",
              "/odom": "nav_msgs/msg/Odometry", "/imu/data": "sensor_msgs/msg/Imu", "/clock": "rosgraph_msgs/msg/Clock"}
    n = len(expected["/odom"]) + len(expected["/route_command"])
    result = run_in_loopback(receive_replay, bag=str(sim_bag), listen=listen, expect=4 * n,
                             replay_args=["--rate", "10", "--loops", "2", "--topics", "/odom", "/route_command",
                                          "--remap", "/odom:=/replay/odom", "--clock", "--wait-for-subscribers", "1",
                                          "--delay", "0.5"])
    assert result["rc"] == 0, result["log"]
    got = {t: [bytes.fromhex(h) for h in v] for t, v in result["got"].items()}
    assert got["/replay/odom"] == [padded(m) for m in expected["/odom"]] * 2
    assert got["/route_command"] == [padded(m) for m in expected["/route_command"]] * 2
    assert got["/odom"] == [] and got["/imu/data"] == []
    report = result["report"]
    assert report["counts"] == {"/replay/odom": 2 * 101, "/route_command": 2 * 11} and report["loops_done"] == 2
    # One /clock per message, holding the message's bag stamp: rising within each loop, restarting after.
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    clock = [store.deserialize_cdr(raw, "rosgraph_msgs/msg/Clock").clock for raw in got["/clock"]]
    ns = [c.sec * 10**9 + c.nanosec for c in clock]
    assert len(ns) == 2 * n and ns[:n] == ns[n:] and ns[:n] == sorted(ns[:n])
    assert ns[0] == 1_700_000_000 * 10**9  # the sim writer's first stamp


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    return parser.parse_args(list(argv))


def test_bad_bag_is_a_typed_error_before_any_ros(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="does not exist"):
        run(_args(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="not a rosbag2 directory"):
        run(_args(str(tmp_path / "empty")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ReplayError, match=r"not an \.mcap file"):
        run(_args(str(tmp_path / "notes.txt")))


def test_node_entry_points_report_their_error_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The colcon entry points (``ros_nodes.cli.node_main``): the node's typed error is one stderr line, exit 2."""
    from blockpilot.ros_nodes import recorder_node, replay_node

    assert replay_node.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "taken").mkdir()
    assert recorder_node.main(["--out", str(tmp_path / "taken")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"replay_node: error: rosbag2 path {tmp_path / 'missing'} does not exist",
        f"recorder_node: error: {tmp_path / 'taken'} exists already; the recorder never overwrites a bag"]


def test_missing_topic_and_bad_options_are_typed_errors(sim_bag: Path) -> None:
    with pytest.raises(ReplayError, match="has no topic /nope"):
        run(_args(str(sim_bag), "--topics", "/nope"))
    with pytest.raises(ReplayError, match="FROM:=TO"):
        run(_args(str(sim_bag), "--remap", "/odom"))
    with pytest.raises(ReplayError, match="rate"):
        ReplayOptions(rate=-1.0)


def test_uninstalled_message_type_names_topic_and_type(tmp_path: Path) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    msg = store.types["tf2_msgs/msg/TFMessage"](transforms=[])
    with Writer(tmp_path / "tf", version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=store)
        writer.write(conn, 1, bytes(store.serialize_cdr(msg, "tf2_msgs/msg/TFMessage")))
    with pytest.raises(MessageTypeError, match="topic /tf: message type tf2_msgs/msg/TFMessage is not installed"):
        run(_args(str(tmp_path / "tf")))
    mcap_file = next((tmp_path / "tf").glob("*.mcap"))  # a bare .mcap file is a bag too
    with pytest.raises(MessageTypeError) as info:
        run(_args(str(mcap_file)))
    assert (info.value.topic, info.value.msgtype) == ("/tf", "tf2_msgs/msg/TFMessage")
