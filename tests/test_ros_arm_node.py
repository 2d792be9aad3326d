"""The arm node under real ROS 2: a one-episode LeRobot dataset (written with LeRobot's own writer) is replayed
into the node (``blockpilot.ros_nodes.lerobot_replay``, its own process) on a random-init robot checkpoint with the
so101-joints schema, inside a loopback-only network namespace; a probe sends the inputs that must be refused.

One loopback session serves the whole module (it returns plain data; the assertions are in the tests). The message
conversions and parameters are checked in-process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ros_harness import child_process, python_module, run_in_loopback, spinning, wait_until

from blockpilot.ros_nodes import arm_conversions as arm
from blockpilot.ros_nodes.arm_params import ArmParams
from blockpilot.ros_nodes.conversions import ConversionError
from blockpilot.ros_nodes.params import ParamsError, load_params_file
from blockpilot.vla.plans import SO101_JOINTS, ActionChunkSchema

NODE = "blockpilot_arm"
SCENE, WRIST = "/camera/scene/image_raw", "/camera/wrist/image_raw"
TRAJECTORY, JSON = "/blockpilot/arm/joint_trajectory", "/blockpilot/arm/plan_json"
FRAMES = 5  # episode length
FPS = 10
SIZE = 128  # the SO-101 simulator's image size
INSTRUCTION = "pick up the cube"


def _episode() -> Any:
    from blockpilot.sim.robot.types import RobotEpisode

    rng = np.random.default_rng(3)
    return RobotEpisode(
        seed=3, task="synthetic", instruction=INSTRUCTION, fps=FPS,
        images={cam: rng.integers(0, 255, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8) for cam in ("front", "wrist")},
        joint_names=SO101_JOINTS, joint_state=rng.uniform(-1, 1, (FRAMES, 6)).astype(np.float32),
        ee_pose=np.tile(np.array([0.2, 0, 0.1, 1, 0, 0, 0], np.float32), (FRAMES, 1)),
        environment_state=np.zeros((FRAMES, 3), np.float32), action_names=SO101_JOINTS,
        actions=rng.uniform(-1, 1, (FRAMES, 6)).astype(np.float32), success=np.zeros(FRAMES, bool))


# ---- the scenario (runs inside the namespace) -------------------------------------------------------------


class Probe:
    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        self.node = rclpy.create_node("arm_probe")
        self.trajectories: list[dict[str, Any]] = []
        self.jsons: list[dict[str, Any]] = []
        self.diags: list[dict[str, Any]] = []
        n = self.node
        n.create_subscription(JointTrajectory, TRAJECTORY, self._on_trajectory, 50)
        n.create_subscription(String, JSON, lambda m: self.jsons.append(json.loads(m.data)), 50)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 200)
        self.scene = n.create_publisher(Image, SCENE, 10)
        self.wrist = n.create_publisher(Image, WRIST, 10)
        self.joints = n.create_publisher(JointState, "/joint_states", 10)
        self.instruction = n.create_publisher(String, "/instruction", 10)

    def _on_trajectory(self, m: Any) -> None:
        self.trajectories.append({
            "stamp": m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, "frame_id": m.header.frame_id,
            "joint_names": list(m.joint_names), "positions": [list(p.positions) for p in m.points],
            "t": [p.time_from_start.sec + p.time_from_start.nanosec / 1e9 for p in m.points]})

    def _on_diag(self, msg: Any) -> None:
        for s in msg.status:
            if s.name.startswith(NODE):
                self.diags.append({"level": int.from_bytes(s.level, "little"), "message": s.message,
                                   "values": {kv.key: kv.value for kv in s.values}})

    def image(self, stamp: int) -> Any:
        from sensor_msgs.msg import Image

        msg = Image(height=SIZE, width=SIZE, encoding="rgb8", step=SIZE * 3, data=bytes(SIZE * SIZE * 3))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
        return msg

    def joint_state(self, stamp: int, names: tuple[str, ...] = SO101_JOINTS) -> Any:
        from sensor_msgs.msg import JointState

        msg = JointState(name=list(names), position=[0.1] * len(names))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
        return msg

    def refused(self, stamp: int) -> dict[str, Any] | None:
        """Send the camera frame of ``stamp`` (wrist first) and wait for its outcome."""
        self.wrist.publish(self.image(stamp))
        self.scene.publish(self.image(stamp))
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [d for d in list(self.diags) if d["values"].get("last_frame_stamp_ns") == str(stamp)]
            return bool(found)

        return found[-1] if wait_until(seen, 20) else None


def scenario_arm(tmp: str, checkpoint: str, dataroot: str) -> dict[str, Any]:
    import time

    import rclpy
    from std_msgs.msg import String

    params = Path(tmp) / "arm.yaml"
    params.write_text(yaml.safe_dump({NODE: {"ros__parameters": {
        "checkpoint": checkpoint, "wrist_image_topic": WRIST, "deadline_ms": 120_000.0, "max_input_age_ms": 250.0,
        "diagnostics_period_s": 0.2}}}))
    out: dict[str, Any] = {"refusals": {}}
    with child_process(python_module("blockpilot.ros_nodes.arm_node", "--params", str(params)), name="arm") as node:
        rclpy.init()
        probe = Probe()
        try:
            with spinning(probe.node):
                assert wait_until(lambda: any(d["values"].get("state") == "active" for d in list(probe.diags)), 120), \
                    "the arm node never reported state=active"
                pubs = (probe.scene, probe.wrist, probe.joints, probe.instruction)
                assert wait_until(lambda: all(p.get_subscription_count() >= 1 for p in pubs), 20)
                now = time.time_ns()
                out["refusals"]["no_instruction"] = probe.refused(now)
                probe.instruction.publish(String(data=INSTRUCTION))
                time.sleep(0.3)
                out["refusals"]["no_joint_state"] = probe.refused(now + 1)
                probe.joints.publish(probe.joint_state(now + 2, SO101_JOINTS[:4] + SO101_JOINTS[5:]))
                time.sleep(0.3)
                out["refusals"]["missing_joint"] = probe.refused(now + 2)
                probe.joints.publish(probe.joint_state(now + 3 - 2 * 10**9))
                time.sleep(0.3)
                out["refusals"]["stale_joint_state"] = probe.refused(now + 3)
                replay = python_module("blockpilot.ros_nodes.lerobot_replay", dataroot, "--rate", "0.5",
                                       "--cameras", "front", "wrist", "--wait-for-subscribers", "1",
                                       "--wait-timeout", "20", "--delay", "1")
                with child_process(replay, name="lerobot_replay") as player:
                    assert player.popen.wait(120) == 0, player.log()
                    out["replay"] = json.loads(player.log().strip().splitlines()[-1])

                def settled() -> bool:
                    v = probe.diags[-1]["values"] if probe.diags else {}
                    return v.get("frames_waiting") == v.get("frames_in_flight") == "0"

                wait_until(lambda: int(probe.diags[-1]["values"]["frames_received"]) >= 4 + FRAMES, 5)
                assert wait_until(settled, 60), "the arm node did not finish planning"
                time.sleep(0.3)
                out["diag"] = probe.diags[-1]
                out["trajectories"], out["jsons"] = list(probe.trajectories), list(probe.jsons)
        finally:
            probe.node.destroy_node()
            rclpy.shutdown()
        out["exit"] = node.stop()
    return out


# ---- the tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-init robot checkpoint (schema so101-joints) and a one-episode LeRobot dataset."""
    from blockpilot.sim.robot.lerobot_io import write_lerobot_dataset
    from blockpilot.vla.reference_model import write_reference_checkpoint
    from blockpilot.vla.schema_io import save_schema

    root = tmp_path_factory.mktemp("arm_node")
    checkpoint = write_reference_checkpoint(root / "ckpt")
    save_schema(checkpoint, ActionChunkSchema.so101_joints())
    return {"root": root, "checkpoint": checkpoint, "dataroot": write_lerobot_dataset([_episode()], root / "episode")}


@pytest.fixture(scope="module")
def session(files: dict[str, Path]) -> dict[str, Any]:
    return run_in_loopback(scenario_arm, tmp=str(files["root"]), checkpoint=str(files["checkpoint"]),
                           dataroot=str(files["dataroot"]), timeout_s=300)


def test_a_replayed_lerobot_episode_gives_one_joint_trajectory_per_plan(session: dict[str, Any]) -> None:
    replay, values = session["replay"], session["diag"]["values"]
    assert replay["frames"] == FRAMES and replay["instruction"] == INSTRUCTION and not replay["interrupted"]
    assert replay["topics"][SCENE] == replay["topics"][WRIST] == replay["topics"]["/joint_states"] == FRAMES
    arrived = int(values["frames_received"]) - 4  # after the four refused frames: the episode's (best effort)
    planned = int(values["frames_planned"])
    assert planned >= 1 and len(session["trajectories"]) == planned == len(session["jsons"])
    assert planned + int(values["frames_dropped_busy"]) == arrived <= FRAMES  # each planned, or replaced by a newer
    schema = ActionChunkSchema.so101_joints()
    for trajectory, plan in zip(session["trajectories"], session["jsons"], strict=True):
        assert trajectory["joint_names"] == list(SO101_JOINTS) and trajectory["frame_id"] == "base_link"
        assert len(trajectory["positions"]) == schema.steps and all(len(p) == 6 for p in trajectory["positions"])
        np.testing.assert_allclose(trajectory["t"], np.arange(1, schema.steps + 1) / schema.rate_hz, atol=1e-9)
        assert plan["stamp_ns"] == trajectory["stamp"] and plan["instruction"] == INSTRUCTION
        np.testing.assert_allclose(plan["actions"], trajectory["positions"])
    assert session["exit"] == 0


def test_inputs_that_cannot_give_a_plan_are_refused_and_diagnosed(session: dict[str, Any]) -> None:
    refusals = session["refusals"]
    assert all(refusals[k] is not None for k in refusals), refusals
    for kind in ("no_instruction", "no_joint_state", "missing_joint", "stale_joint_state"):
        assert int(refusals[kind]["values"][f"frames_{kind}"]) == 1, kind
    assert refusals["no_instruction"]["level"] == 1 and "/instruction" in refusals["no_instruction"]["message"]
    assert refusals["no_joint_state"]["level"] == 1
    assert refusals["missing_joint"]["level"] == 2 and "'wrist_roll'" in refusals["missing_joint"]["message"]
    assert refusals["stale_joint_state"]["level"] == 1 and "2000 ms" in refusals["stale_joint_state"]["message"]
    refused_stamps = {int(r["values"]["last_frame_stamp_ns"]) for r in refusals.values()}
    assert not refused_stamps & {t["stamp"] for t in session["trajectories"]}  # nothing published for them


# ---- in-process: conversions, parameters ------------------------------------------------------------------


def _joint_state(names: list[str], positions: list[float]) -> Any:
    from sensor_msgs.msg import JointState

    return JointState(name=names, position=positions)


def test_joint_state_in_schema_order_and_refusals_name_the_joint() -> None:
    names = list(reversed(SO101_JOINTS))
    state = arm.joint_state_vector(_joint_state(names, [6, 5, 4, 3, 2, 1]), SO101_JOINTS, "/js")
    np.testing.assert_array_equal(state, [1, 2, 3, 4, 5, 6])
    with pytest.raises(ConversionError, match="'elbow_flex'") as missing:
        arm.joint_state_vector(_joint_state(names[:3] + names[4:], [0.0] * 5), SO101_JOINTS, "/js")
    assert missing.value.kind == "missing_joint"
    with pytest.raises(ConversionError, match="gripper") as nan:
        arm.joint_state_vector(_joint_state(names, [math.nan, 0, 0, 0, 0, 0]), SO101_JOINTS, "/js")
    assert nan.value.kind == "nonfinite_joint_state"
    with pytest.raises(ConversionError) as short:
        arm.joint_state_vector(_joint_state(names, [0.0]), SO101_JOINTS, "/js")
    assert short.value.kind == "malformed_joint_state"


def test_ee_deltas_integrate_from_the_pose_or_from_the_gripper() -> None:
    schema = ActionChunkSchema.so101_ee()  # dx, dy, dz, gripper
    actions = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, -1.0, 0.0]])
    positions, quats = arm.ee_waypoints(actions, schema.dims, 0.025)
    np.testing.assert_allclose(positions, [[0.025, 0, 0], [0.05, 0.025, 0], [0.05, 0.025, -0.025]])
    np.testing.assert_allclose(quats, [[1, 0, 0, 0]] * 3)
    start = (np.array([0.2, 0.0, 0.1]), np.array([0.0, 0.0, 0.0, 1.0]))
    positions, quats = arm.ee_waypoints(actions, schema.dims, 0.025, start)
    np.testing.assert_allclose(positions[-1], [0.25, 0.025, 0.075])
    np.testing.assert_allclose(quats[-1], [0, 0, 0, 1])
    turn = np.zeros((2, 7))
    turn[:, 5] = math.pi / 2  # dyaw, twice: a half turn about z
    _, quats = arm.ee_waypoints(turn, ActionChunkSchema.ee_delta().dims, 1.0)
    np.testing.assert_allclose(np.abs(quats[-1]), [0, 0, 0, 1], atol=1e-12)
    msg = arm.trajectory_msg(np.zeros((8, 6)), SO101_JOINTS, 30.0, 1_500_000_000, "base_link")
    assert [p.time_from_start.nanosec for p in msg.points[:2]] == [33_333_333, 66_666_667]
    assert msg.header.stamp.sec == 1 and msg.header.stamp.nanosec == 500_000_000


def test_arm_params_are_validated_and_loaded_from_a_params_file(tmp_path: Path) -> None:
    assert ArmParams().cameras == 1 and ArmParams(wrist_image_topic="/w").cameras == 2
    assert ArmParams(checkpoint="c", wrist_image_topic="/w").planner_options()["cameras"] == 2
    assert "cameras" not in ArmParams(bundle="b").planner_options()
    for bad, field in (({"output_kind": "path"}, "output_kind"), ({"max_input_age_ms": 0}, "max_input_age_ms"),
                       ({"joint_state_topic": "bad topic"}, "joint_state_topic"), ({"gripper_frame": "/g"},
                                                                                  "gripper_frame")):
        with pytest.raises(ParamsError, match=field):
            ArmParams(**bad)
    path = tmp_path / "arm.yaml"
    path.write_text(yaml.safe_dump({NODE: {"ros__parameters": {"checkpoint": "ckpt", "ee_delta_scale": 1}}}))
    loaded = load_params_file(path, NODE, ArmParams)
    assert isinstance(loaded, ArmParams) and loaded.ee_delta_scale == 1.0 and loaded.checkpoint == "ckpt"
    path.write_text(yaml.safe_dump({NODE: {"ros__parameters": {"checkpoint": "ckpt", "odometry_topic": "/o"}}}))
    with pytest.raises(ParamsError, match="odometry_topic: unknown parameter"):
        load_params_file(path, NODE, ArmParams)


def test_lerobot_replay_refuses_a_missing_episode_before_starting_ros(files: dict[str, Path],
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from blockpilot.ros_nodes.lerobot_replay import main

    assert main([str(files["dataroot"]), "--episode", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lerobot_replay_node: error: --episode 3:") and "1 episode(s)" in err, err


def test_a_model_reading_simulator_state_is_refused_at_configure_naming_the_dims() -> None:
    from types import SimpleNamespace

    from blockpilot.ros_nodes.arm_node import ArmNode

    params = ArmParams(checkpoint="models/robot-so101")
    node = SimpleNamespace(_output="joint_trajectory")
    with pytest.raises(ParamsError, match="block_dx, block_dy, block_dz") as refused:
        ArmNode._check_planner(node, SimpleNamespace(schema=ActionChunkSchema.so101_ee_block()), params)  # type: ignore[arg-type]
    assert "JointState" in str(refused.value)
    ArmNode._check_planner(node, SimpleNamespace(schema=ActionChunkSchema.so101_ee()), params)  # type: ignore[arg-type]
    assert node._output == "pose_array"
