"""The recorder with real rclpy on loopback (bags rosbags reads back; a killed recorder leaves no bag at
its output, a stopped one a complete bag) and the score of a recorded run against a direct computation."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ros_harness import run_in_loopback
from sim_writer_fixtures import FRONT, make_scene, render

from blockpilot.eval.types import DatasetError
from blockpilot.ros_nodes.params import PlannerParams
from blockpilot.ros_nodes.score import BagError, ScoreError, score_run
from blockpilot.sim.types import Scene
from blockpilot.sim.writers.mcap_writer import write_rosbag2

S = 1_000_000_000
START = 1_700_000_000 * S  # the sim writer's clock for the first scene
TOPICS = PlannerParams()
PATH, PLAN, DIAG = TOPICS.path_topic, TOPICS.plan_json_topic, TOPICS.diagnostics_topic
FULL_STEPS = (20, 30, 45, 60, 70)  # paths at 2.0 .. 7.0 s: their 3 s future lies inside the 10 s scene


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene(7, 0.08, "turn left")


@pytest.fixture(scope="module")
def source_bag(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rosbag2(scene, tmp_path_factory.mktemp("source") / "left", camera=FRONT, render=render)


def straight_plan() -> np.ndarray:
    """The plan every path carries: 10 m/s straight ahead, six waypoints 0.5 s apart (ego frame)."""
    return np.column_stack([5.0 * np.arange(1, 7), np.zeros(6)])


def ego_pose(scene: Scene, step: int) -> tuple[np.ndarray, float]:
    x, y, yaw = scene.ego.states[step, :3]
    return np.array([x, y]), float(yaw)


def to_world(scene: Scene, step: int, xy: np.ndarray) -> np.ndarray:
    origin, yaw = ego_pose(scene, step)
    c, s = math.cos(yaw), math.sin(yaw)
    return np.column_stack([c * xy[:, 0] - s * xy[:, 1], s * xy[:, 0] + c * xy[:, 1]]) + origin


def planned_paths(scene: Scene) -> list[dict[str, Any]]:
    """Paths stamped at scene steps: the full-future ones (one also in the odom frame), one whose future
    runs past the scene, and two stamped outside the odometry."""
    plan = straight_plan()
    paths = [{"stamp": START + step * S // 10, "frame": "base_link", "xy": plan.tolist()} for step in FULL_STEPS]
    paths.append({"stamp": START + 45 * S // 10, "frame": "odom", "xy": to_world(scene, 45, plan).tolist()})
    paths.append({"stamp": START + 85 * S // 10, "frame": "base_link", "xy": plan.tolist()})
    paths += [{"stamp": START - S, "frame": "base_link", "xy": plan.tolist()},
              {"stamp": START + 12 * S, "frame": "base_link", "xy": plan.tolist()}]
    return paths


# ---- run inside the namespace -------------------------------------------------------------------


def _publisher_node(name: str) -> tuple[Any, dict[str, Any]]:
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry, Path
    from rclpy.node import Node
    from std_msgs.msg import String

    node = Node(name)
    types = {PATH: Path, PLAN: String, DIAG: DiagnosticArray, "/odom": Odometry}
    pubs = {topic: node.create_publisher(cls, topic, 10) for topic, cls in types.items()}
    return node, pubs


def _path_msg(path: dict[str, Any]) -> Any:
    from blockpilot.ros_nodes.conversions import path_msg

    return path_msg(np.asarray(path["xy"]), path["stamp"], path["frame"])


def _publish_all(pubs: dict[str, Any], paths: list[dict[str, Any]], plans: list[str]) -> None:
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from nav_msgs.msg import Odometry
    from std_msgs.msg import String

    for path in paths:
        pubs[PATH].publish(_path_msg(path))
    for text in plans:
        pubs[PLAN].publish(String(data=text))
    pubs[DIAG].publish(DiagnosticArray(status=[DiagnosticStatus(name="planner", message="ok")]))
    odom = Odometry()
    odom.header.frame_id, odom.child_frame_id = "odom", "base_link"
    pubs["/odom"].publish(odom)
    from rclpy.duration import Duration

    for pub in pubs.values():
        assert pub.wait_for_all_acked(Duration(seconds=10))


def scenario_record(out: str, paths: list[dict[str, Any]], plans: list[str]) -> dict[str, Any]:
    import rclpy
    from ros_harness import spinning, wait_until

    from blockpilot.ros_nodes.recorder_node import RecorderNode

    rclpy.init()
    recorder = RecorderNode(out)
    partial_while_running = [p.name for p in Path(out).parent.iterdir()]
    node, pubs = _publisher_node("record_probe")
    with spinning(recorder, node):
        assert wait_until(lambda: all(p.get_subscription_count() for p in pubs.values()), timeout_s=20)
        _publish_all(pubs, paths, plans)
        wanted = {PATH: len(paths), PLAN: len(plans), DIAG: 1, "/odom": 1}
        wait_until(lambda: recorder.counts == wanted, timeout_s=10)
    counts = dict(recorder.counts)
    bag = recorder.close()
    recorder.destroy_node()
    node.destroy_node()
    rclpy.shutdown()
    return {"counts": counts, "bag": str(bag), "while_running": partial_while_running,
            "after": sorted(p.name for p in Path(out).parent.iterdir())}


def scenario_stop(root: str, paths: list[dict[str, Any]]) -> dict[str, Any]:
    """Recorder processes stopped by SIGKILL, SIGTERM and SIGINT after five paths each."""
    import rclpy
    from ros_harness import child_process, python_module, wait_until

    rclpy.init()
    node, pubs = _publisher_node("stop_probe")
    out: dict[str, Any] = {}
    for name, sig in (("terminated", signal.SIGTERM), ("interrupted", signal.SIGINT), ("killed", signal.SIGKILL)):
        bag = Path(root) / name
        argv = python_module("blockpilot.ros_nodes.recorder_node", "--out", str(bag), "--ros-args", "-r",
                             f"__node:=recorder_{name}")

        def subscribed(name: str = name) -> bool:
            return all(any(i.node_name == f"recorder_{name}" for i in node.get_subscriptions_info_by_topic(t))
                       for t in pubs)

        with child_process(argv, name=name) as child:
            assert wait_until(subscribed, timeout_s=30), child.log()
            _publish_all(pubs, paths, [])
            rc = child.stop(sig)
            partials = sorted(str(p.relative_to(root)) for p in Path(root).glob(f".{name}.partial-*/**/*"))
            out[name] = {"rc": rc, "exists": bag.exists(), "log": child.log()[-1500:], "partials": partials}
    node.destroy_node()
    rclpy.shutdown()
    return out


# ---- tests --------------------------------------------------------------------------------------


def _read(bag: Path) -> dict[str, list[Any]]:
    from rosbags.highlevel import AnyReader

    out: dict[str, list[Any]] = {}
    with AnyReader([bag]) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            PATH: "nav_msgs/msg/Path", PLAN: "std_msgs/msg/String", DIAG: "diagnostic_msgs/msg/DiagnosticArray",
            "/odom": "nav_msgs/msg/Odometry"}
        for conn, _, raw in reader.messages():
            out.setdefault(conn.topic, []).append(reader.deserialize(raw, conn.msgtype))
    return out


def direct_l2(scene: Scene) -> dict[str, float]:
    """L2 at 1, 2, 3 s of the straight plan against the scene's own ego states, averaged over the
    full-future paths (the one at step 45 counts twice: once per frame)."""
    steps = [*FULL_STEPS, 45]
    per_h = {}
    for h in (1, 2, 3):
        errors = []
        for step in steps:
            origin, yaw = ego_pose(scene, step)
            future = scene.ego.states[step + 10 * h, :2] - origin
            c, s = math.cos(yaw), math.sin(yaw)
            gt = np.array([c * future[0] + s * future[1], -s * future[0] + c * future[1]])
            errors.append(float(np.hypot(*(straight_plan()[2 * h - 1] - gt))))
        per_h[str(h)] = float(np.mean(errors))
    per_h["avg"] = float(np.mean(list(per_h.values())))
    return per_h


def test_recorded_bag_reads_back_and_scores_like_a_direct_computation(
        scene: Scene, source_bag: Path, tmp_path: Path) -> None:
    paths = planned_paths(scene)
    plans = ['{"parse_error": null, "waypoints": []}', '{"parse_error": "no trajectory"}', "not json"]
    result = run_in_loopback(scenario_record, out=str(tmp_path / "run"), paths=paths, plans=plans)
    assert result["counts"] == {PATH: len(paths), PLAN: 3, DIAG: 1, "/odom": 1}
    assert [n.startswith(".run.partial-") for n in result["while_running"]] == [True]
    assert result["after"] == ["run"]  # the partial directory is gone once the bag is in place
    messages = _read(tmp_path / "run")
    got = [(m.header.stamp.sec * S + m.header.stamp.nanosec, m.header.frame_id,
            [[p.pose.position.x, p.pose.position.y] for p in m.poses]) for m in messages[PATH]]
    assert got == [(p["stamp"], p["frame"], p["xy"]) for p in paths]
    assert [m.data for m in messages[PLAN]] == plans
    assert messages[DIAG][0].status[0].message == "ok"

    summary = score_run(tmp_path / "run", source_bag)
    assert summary["paths"] == len(paths) and summary["scored"] == len(paths) - 2
    assert summary["skipped"] == {"stamped outside the source odometry": 2}
    assert summary["model"]["full_future"] == len(FULL_STEPS) + 1
    assert summary["model"]["excluded_partial_future"] == 1
    expected = direct_l2(scene)
    assert summary["l2_m"] == pytest.approx(expected, abs=1e-9)
    assert expected["3"] > expected["1"] > 0.05  # the scene turns left, the plan goes straight
    assert summary["plans"] == {"messages": 3, "parse_errors": 1, "not_json": 1}
    # Constant velocity at the odometry's speed (10 m/s up to the scene's finite differences) is
    # nearly the same straight line.
    assert summary["cv"]["l2"]["uniad"]["3"] == pytest.approx(expected["3"], abs=1e-3)


def test_killed_recorder_leaves_no_bag_and_stopped_ones_a_complete_one(scene: Scene, tmp_path: Path) -> None:
    from blockpilot.eval.mcap import find_bags

    paths = planned_paths(scene)[:5]
    result = run_in_loopback(scenario_stop, root=str(tmp_path), paths=paths)
    killed = result["killed"]
    assert killed["rc"] == -signal.SIGKILL and not killed["exists"]
    assert killed["partials"] and not any(p.endswith("metadata.yaml") for p in killed["partials"])
    with pytest.raises(DatasetError, match="does not exist"):
        find_bags(tmp_path / "killed")
    for name in ("terminated", "interrupted"):
        stopped = result[name]
        assert stopped["rc"] == 0 and stopped["exists"] and stopped["partials"] == [], stopped["log"]
        assert len(_read(tmp_path / name)[PATH]) == 5


def write_path_bag(bag: Path, paths: list[dict[str, Any]]) -> Path:
    """A recorded-run bag written with rosbags alone: ``paths`` on the planner's path topic."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    t = store.types
    with Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection(PATH, "nav_msgs/msg/Path", typestore=store)
        for i, path in enumerate(paths):
            sec, nanosec = divmod(path["stamp"], S)
            header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                              frame_id=path["frame"])
            poses = [t["geometry_msgs/msg/PoseStamped"](header=header, pose=t["geometry_msgs/msg/Pose"](
                position=t["geometry_msgs/msg/Point"](x=float(x), y=float(y), z=0.0),
                orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))) for x, y in path["xy"]]
            msg = t["nav_msgs/msg/Path"](header=header, poses=poses)
            writer.write(conn, i, bytes(store.serialize_cdr(msg, "nav_msgs/msg/Path")))
    return bag


def test_score_cli_prints_and_writes_the_summary(scene: Scene, source_bag: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    recorded = write_path_bag(tmp_path / "run", planned_paths(scene))
    cmd = [sys.executable, "-m", "blockpilot.cli", "ros", "score", "--recorded", str(recorded), "--source",
           str(source_bag), "--json-out", str(tmp_path / "score.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed, written = json.loads(result.stdout), json.loads((tmp_path / "score.json").read_text())
    assert printed["l2_m"] == written["l2_m"] == pytest.approx(direct_l2(scene), abs=1e-9)
    assert "model" in written and "model" not in printed  # the full breakdown goes to --json-out / --json only
    assert written["plans"] == {"messages": 0, "parse_errors": 0, "not_json": 0}  # no plan JSON topic recorded
    bad = subprocess.run([*cmd[:6], str(tmp_path / "missing"), *cmd[7:9]], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_score_errors_are_typed(source_bag: Path, tmp_path: Path) -> None:
    with pytest.raises(BagError, match="does not exist"):
        score_run(tmp_path / "missing", source_bag)
    with pytest.raises(BagError, match=f"has no topic {PATH}"):
        score_run(source_bag, source_bag)
    with pytest.raises(ScoreError, match="frame 'map'"):
        score_run(write_path_bag(tmp_path / "map", [{"stamp": START + 3 * S, "frame": "map", "xy": [[1.0, 0.0]]}]),
                  source_bag)
    with pytest.raises(ScoreError, match="waypoint_rate_hz"):
        score_run(source_bag, source_bag, waypoint_rate_hz=0.0)
