"""``ArmNode``: a ROS 2 lifecycle node that plans an arm's next action chunk with a manipulation
:class:`~blockpilot.runtime.planner.Planner` (an action-chunk schema such as ``so101-joints`` or ``so101-ee``).

Inputs: the third-person camera as ``sensor_msgs/Image`` (best effort; each frame is one plan), optionally the
wrist camera (``wrist_image_topic``, the model's second image), ``sensor_msgs/JointState`` (the state in the
schema's joint order), the instruction as ``std_msgs/String`` (reliable; the latest one holds) and optionally the
end-effector pose as ``geometry_msgs/PoseStamped``.

Outputs, for a valid plan only, stamped with the newest input's stamp: for a joint-target schema a
``trajectory_msgs/JointTrajectory`` (the schema's dims as joint names, one point per chunk row at
``time_from_start = (k + 1) / rate_hz``); for an end-effector-delta schema a ``geometry_msgs/PoseArray`` of the
waypoints, integrated from the current end-effector pose when a fresh one is known (``frame_id``: that pose's
frame) and else relative to the gripper (``frame_id``: ``gripper_frame``); the plan as JSON; and, as for the
driving node, the processing time and diagnostics.

The mailbox, deadline and refusal rules are those of every planning node (:mod:`blockpilot.ros_nodes.node_base`).
A camera frame is refused (diagnosed, nothing published) when no instruction was received, when no joint state
was, when the joint state or the wrist frame lies further than ``max_input_age_ms`` against the
camera stamp (either way), or when the joint state lacks a joint the schema needs (the diagnostic names it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from geometry_msgs.msg import PoseArray, PoseStamped
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..runtime.backend import BackendError
from ..runtime.plan_types import RobotObservation
from ..runtime.planner import Planner
from ..vla.plans import ActionChunkPlan, ActionChunkSchema
from ..vla.robot_state import DERIVED_STATE_DIMS
from . import arm_conversions as arm
from . import conversions as conv
from .arm_params import DEFAULT_ARM_NODE_NAME, ArmParams
from .node_base import Frame, PlanningNode, qos, run_node
from .params import ParamsError

LIVE_PARAMETERS = ("deadline_ms", "max_input_age_ms", "output_frame", "gripper_frame", "ee_delta_scale",
                   "default_instruction")
OUTPUT_OF_ACTION = {"joint_targets": "joint_trajectory", "ee_delta": "pose_array"}


class ArmNode(PlanningNode):
    """The manipulation planner as a managed node; ``params`` are the declared parameters' defaults."""

    params_class = ArmParams
    live_parameters = LIVE_PARAMETERS

    def __init__(self, params: ArmParams | None = None, *, node_name: str = DEFAULT_ARM_NODE_NAME,
                 **node_kwargs: Any) -> None:
        self._output = "joint_trajectory"
        super().__init__(params, node_name=node_name, **node_kwargs)

    @property
    def schema(self) -> ActionChunkSchema:
        assert self.planner is not None and isinstance(self.planner.schema, ActionChunkSchema)
        return self.planner.schema

    def _check_planner(self, planner: Planner, params: ArmParams) -> None:
        schema = planner.schema
        if not isinstance(schema, ActionChunkSchema):
            raise ParamsError("bundle" if params.bundle else "checkpoint",
                              f"{params.model_path} answers in a {type(schema).__name__} layout; the arm node plans "
                              "action chunks (a checkpoint or bundle with an action-chunk schema, e.g. so101-joints)")
        derived = [d for d in schema.state_dims if d in DERIVED_STATE_DIMS]
        if derived:  # the node fills the state from JointState alone: joint dims only
            raise ParamsError("bundle" if params.bundle else "checkpoint",
                              f"{params.model_path} reads state dim(s) {', '.join(derived)} (simulator state), which "
                              "the arm node cannot fill from sensor_msgs/JointState; it plans with models whose "
                              "state is joint positions only")
        wanted = OUTPUT_OF_ACTION[schema.action]
        if params.output_kind not in ("auto", wanted):
            raise ParamsError("output_kind", f"{params.output_kind!r} does not fit the model's {schema.action} "
                                             f"actions ({', '.join(schema.dims)}); use {wanted} or auto")
        if wanted == "pose_array" and not set(arm.POSITION_DIMS) <= set(schema.dims):
            raise ParamsError("output_kind", f"ee poses need dims {', '.join(arm.POSITION_DIMS)}; the model's are "
                                             f"{', '.join(schema.dims)}")
        self._output = wanted

    def _details(self, params: ArmParams) -> dict[str, str]:
        schema = self.schema
        return {"max_input_age_ms": f"{params.max_input_age_ms:g}", "output": self._output,
                "action": schema.action, "dims": ",".join(schema.dims), "cameras": str(params.cameras)}

    def _reset_inputs(self, params: ArmParams) -> None:
        with self._input_lock:
            self._joint_state: Any = None
            self._wrist: Any = None
            self._ee_pose: Any = None
            self._instruction = ""

    def _warm_up(self, planner: Planner) -> None:
        """One plan on grey frames, so that the first camera frame does not pay for lazy initialisation."""
        vision = planner.config.vision
        side = vision.window_size if vision is not None else 0
        images = [np.full((side, side, 3), 127, np.uint8)] * self.params.cameras if vision is not None else []
        state = np.zeros(len(self.schema.state_dims) or 1)
        try:
            planner.plan(RobotObservation(images=images, instruction="warm up", state=state))
        except BackendError as exc:
            self.get_logger().warning(f"warm-up plan failed (the first frame pays for it): {exc}")

    def _create_entities(self, p: ArmParams) -> None:
        out = qos(True, 10)
        if self._output == "joint_trajectory":
            self._pubs["trajectory"] = self.create_lifecycle_publisher(JointTrajectory, p.trajectory_topic, out)
        else:
            self._pubs["pose_array"] = self.create_lifecycle_publisher(PoseArray, p.pose_array_topic, out)
        self._pubs["json"] = self.create_lifecycle_publisher(String, p.plan_json_topic, out)
        camera, sensors = qos(False, p.camera_queue_depth), qos(False, 50)
        subscribe = self.create_subscription
        self._entities.append(subscribe(Image, p.image_topic, lambda m: self._on_frame(m, p.image_topic, False),
                                        camera))
        if p.wrist_image_topic:
            self._entities.append(subscribe(Image, p.wrist_image_topic, lambda m: self._keep("_wrist", m), camera))
        if p.ee_pose_topic:
            self._entities.append(subscribe(PoseStamped, p.ee_pose_topic, lambda m: self._keep("_ee_pose", m),
                                            sensors))
        self._entities.append(subscribe(JointState, p.joint_state_topic, lambda m: self._keep("_joint_state", m),
                                        sensors))
        self._entities.append(subscribe(String, p.instruction_topic, self._on_instruction, qos(True, 10)))

    # ---- executor callbacks (short) ----------------------------------------------------------------

    def _keep(self, attribute: str, msg: Any) -> None:
        with self._input_lock:
            setattr(self, attribute, msg)

    def _on_instruction(self, msg: String) -> None:
        text = str(msg.data).strip()
        if text:
            with self._input_lock:
                self._instruction = text
        self.diagnostics.input("instruction", bool(text), f"{self.params.instruction_topic}: an empty instruction "
                                                          "was refused; keeping the previous one")

    # ---- planning thread -----------------------------------------------------------------------------

    def _refuse(self, kind: str, message: str, stamp: int) -> None:
        self.diagnostics.outcome(kind, message, stamp_ns=stamp)

    @staticmethod
    def _image(msg: Any, topic: str) -> Any:
        try:
            return conv.image_from_raw(msg)
        except conv.ConversionError as exc:
            raise conv.ImageError(f"{topic}: {exc}") from None

    def _plan(self, frame: Frame) -> None:
        p, schema = self.params, self.schema
        stamp = conv.stamp_ns(frame.msg.header.stamp)
        max_age = round(p.max_input_age_ms * 1e6)
        with self._input_lock:
            joint_state, wrist, ee_pose = self._joint_state, self._wrist, self._ee_pose
            instruction = self._instruction or p.default_instruction.strip()
        if not instruction:
            return self._refuse("no_instruction", f"{p.instruction_topic}: no instruction received yet (and no "
                                                  "default_instruction)", stamp)
        if joint_state is None:
            return self._refuse("no_joint_state", f"{p.joint_state_topic}: no joint state received yet", stamp)
        if arm.age_ns(stamp, joint_state) > max_age:
            return self._refuse("stale_joint_state", f"{p.joint_state_topic}: joint state "
                                f"{arm.age_ns(stamp, joint_state) / 1e6:.0f} ms from the camera frame (max "
                                f"{p.max_input_age_ms:g} ms)", stamp)
        if p.wrist_image_topic and (wrist is None or arm.age_ns(stamp, wrist) > max_age):
            age = "none received yet" if wrist is None else f"{arm.age_ns(stamp, wrist) / 1e6:.0f} ms from the frame"
            return self._refuse("stale_camera", f"{p.wrist_image_topic}: wrist frame {age} (max "
                                                f"{p.max_input_age_ms:g} ms)", stamp)
        try:
            state = arm.joint_state_vector(joint_state, schema.state_dims, p.joint_state_topic)
            images = [self._image(frame.msg, frame.topic)]
            if p.wrist_image_topic:
                images.append(self._image(wrist, p.wrist_image_topic))
            fresh_pose = ee_pose is not None and arm.age_ns(stamp, ee_pose) <= max_age
            start = arm.pose_of(ee_pose, p.ee_pose_topic) if fresh_pose else None
        except conv.ConversionError as exc:
            return self._refuse(exc.kind, str(exc), stamp)
        used = [joint_state, *([wrist] if p.wrist_image_topic else []), *([ee_pose] if fresh_pose else [])]
        newest = max([stamp, *(conv.stamp_ns(m.header.stamp) for m in used)])
        plan = self._run_planner(RobotObservation(images=images, instruction=instruction, state=state),
                                 frame.topic, stamp)
        if plan is None:
            return None
        chunk = plan.plan if isinstance(plan.plan, ActionChunkPlan) else None

        def publish(latency: float) -> None:
            assert chunk is not None
            if self._output == "joint_trajectory":
                frame_id = p.output_frame
                self._pubs["trajectory"].publish(arm.trajectory_msg(chunk.actions, schema.dims, schema.rate_hz,
                                                                    newest, frame_id))
            else:
                frame_id = ee_pose.header.frame_id if start is not None else p.gripper_frame
                positions, quats = arm.ee_waypoints(chunk.actions, schema.dims, p.ee_delta_scale, start)
                self._pubs["pose_array"].publish(arm.pose_array_msg(positions, quats, newest, frame_id))
            self._pubs["json"].publish(String(data=conv.plan_json(
                plan, stamp=newest, frame_id=frame_id, latency_ms=latency, instruction=instruction,
                dims=list(schema.dims), rate_hz=schema.rate_hz)))

        self._deliver(plan, frame, newest, chunk is not None, publish)
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the arm node until SIGINT, SIGTERM or a shutdown transition; returns the exit status.

    ``--params FILE`` is a ROS 2 params file (see :mod:`blockpilot.ros_nodes.arm_params`); ``--autostart``
    (the default) configures and activates the node at once; ``--ros-args ...`` go to rclpy.
    """
    return run_node(ArmNode, argv, command="arm", default_name=DEFAULT_ARM_NODE_NAME)


if __name__ == "__main__":
    raise SystemExit(main())
