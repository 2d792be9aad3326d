"""End to end on loopback: a generated scene's rosbag2 replayed into the planner node (the reference model
exported to a bundle, on ONNX Runtime), its outputs recorded, and the recorded run scored."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ros_harness import run_in_loopback

from blockpilot.ros_nodes.params import PlannerParams
from blockpilot.ros_nodes.score import read_paths, score_run
from blockpilot.sim.generator import generate_scene
from blockpilot.sim.writers.mcap_writer import write_rosbag2

REPO = Path(__file__).resolve().parents[1]
SCENE_S = 9.0


def scenario_replay_plan_record(bag: str, params: str, out: str) -> dict[str, Any]:
    """Planner (autostart), recorder and replay as three processes; the replay starts once the planner
    has subscribed, the recorder is stopped (SIGINT) after the planner has had time for the last frame."""
    import time

    from ros_harness import child_process, python_module

    planner = python_module("blockpilot.ros_nodes.planner_node", "--params", params)
    recorder = python_module("blockpilot.ros_nodes.recorder_node", "--out", out)
    replay = python_module("blockpilot.ros_nodes.replay_node", bag, "--topics", "/camera/front/image_raw/compressed",
                           "/odom", "/route_command", "--wait-for-subscribers", "1", "--wait-timeout", "120",
                           "--delay", "2.0")
    with child_process(planner, name="planner") as planner_proc, child_process(recorder, name="recorder") as rec:
        with child_process(replay, name="replay") as replay_proc:
            replay_rc = replay_proc.popen.wait(timeout=150)
            replay_log = replay_proc.log()
        time.sleep(3.0)  # the frame in flight when the replay ended
        recorder_rc = rec.stop()
        return {"replay_rc": replay_rc, "replay_log": replay_log, "recorder_rc": recorder_rc,
                "recorder_log": rec.log(), "planner_log": planner_proc.log()[-4000:]}


def test_replayed_scene_through_planner_is_recorded_and_scored(tmp_path: Path) -> None:
    bag = write_rosbag2(generate_scene(11, duration_s=SCENE_S), tmp_path / "scene")
    export = subprocess.run([sys.executable, "-m", "blockpilot.cli", "export", "--checkpoint",
                             str(REPO / "models" / "reference"), "--out", str(tmp_path / "bundle")],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    params = tmp_path / "planner.yaml"
    params.write_text(yaml.safe_dump({"blockpilot_planner": {"ros__parameters": {
        "bundle": str(tmp_path / "bundle"), "backend": "onnxruntime", "threads": 1, "deadline_ms": 5000.0}}}))

    result = run_in_loopback(scenario_replay_plan_record, timeout_s=300, bag=str(bag), params=str(params),
                             out=str(tmp_path / "run"))
    logs = "\n".join(f"--- {k}\n{v}" for k, v in result.items() if k.endswith("log"))
    assert result["replay_rc"] == 0 and result["recorder_rc"] == 0, logs
    report = next(json.loads(line) for line in result["replay_log"].splitlines() if line.startswith('{"bag"'))
    assert report["counts"]["/camera/front/image_raw/compressed"] == round(SCENE_S * 10) + 1

    topics = PlannerParams()
    paths = read_paths(tmp_path / "run", topics.path_topic)
    assert len(paths) >= 5, logs  # a plan takes well under a second; frames in between are dropped
    assert all(p.frame_id == topics.output_frame and p.xy.shape == (6, 2) for p in paths)
    # Each path is its plan JSON's waypoints, at the camera stamp.
    from rosbags.highlevel import AnyReader

    with AnyReader([tmp_path / "run"]) as reader:
        conns = [c for c in reader.connections if c.topic == topics.plan_json_topic]
        plans = [json.loads(reader.deserialize(raw, c.msgtype).data) for c, _, raw in reader.messages(conns)]
    by_stamp = {p["stamp_ns"]: p for p in plans}
    for path in paths:
        np.testing.assert_allclose(path.xy, np.asarray(by_stamp[path.stamp_ns]["waypoints"])[:, :2], atol=1e-9)

    summary = score_run(tmp_path / "run", bag)
    assert summary["paths"] == len(paths) and summary["skipped"] == {}
    assert summary["model"]["full_future"] >= 2, summary
    l2 = summary["l2_m"]
    assert all(l2[k] is not None and math.isfinite(l2[k]) for k in ("1", "2", "3", "avg")), summary
    assert 0 <= l2["1"] <= l2["3"] < 15.0, summary  # a driving plan, not noise
    print(json.dumps({"paths": len(paths), "l2_m": l2, "cv_l2_m": summary["cv_l2_m"]}))


def scenario_cli_planner_with_shipped_params() -> dict[str, Any]:
    """`blockpilot ros planner` with no --params: the YAML shipped in the package, models/reference on torch
    (a path relative to the working directory, as ROS takes it)."""
    import os

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from ros_harness import child_process, spinning, wait_until

    os.chdir(REPO)
    rclpy.init()
    node = rclpy.create_node("cli_probe")
    states: list[str] = []
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: states.extend(
        kv.value for s in m.status for kv in s.values if kv.key == "state"), 50)
    with spinning(node), child_process([sys.executable, "-m", "blockpilot.cli", "ros", "planner"], name="cli") as cli:
        active = wait_until(lambda: "active" in states, timeout_s=120)
        rc = cli.stop()
        log = cli.log()
    node.destroy_node()
    rclpy.shutdown()
    return {"active": active, "rc": rc, "log": log[-3000:]}


def test_cli_planner_runs_with_the_shipped_params() -> None:
    result = run_in_loopback(scenario_cli_planner_with_shipped_params, timeout_s=240)
    assert result["active"] and result["rc"] == 0, result["log"]
