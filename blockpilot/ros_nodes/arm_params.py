"""The arm node's parameters: :class:`~blockpilot.ros_nodes.params.ModelParams` (checkpoint or bundle, backend,
decoder, deadline) plus its inputs and outputs. A params file in the ROS 2 layout, for example::

    blockpilot_arm:
      ros__parameters:
        checkpoint: models/robot          # or bundle: path/to/bundle (exactly one of the two)
        decoder: scaffold
        deadline_ms: 500.0                # frame received -> plan ready; a later plan is not published
        max_input_age_ms: 250.0           # |camera stamp - joint state (wrist camera, ee pose) stamp| that still plans
        default_instruction: ""           # "": refuse until an instruction arrives on instruction_topic
        output_kind: auto                 # auto | joint_trajectory | pose_array (auto: by the schema's action)
        output_frame: base_link           # frame id of the trajectory and of the JSON plan
        gripper_frame: gripper            # frame id of ee poses when no ee pose is known (deltas from the gripper)
        ee_delta_scale: 1.0               # metres (and radians) per unit of an ee-delta action (0.025 for so101-ee)
        image_topic: /camera/scene/image_raw       # the third-person camera; each frame is one plan
        wrist_image_topic: ""                      # "": one camera; else the wrist camera, the model's second image
        joint_state_topic: /joint_states
        instruction_topic: /instruction
        ee_pose_topic: ""                          # geometry_msgs/PoseStamped of the end effector; "" off
        trajectory_topic: /blockpilot/arm/joint_trajectory
        pose_array_topic: /blockpilot/arm/ee_poses
        plan_json_topic: /blockpilot/arm/plan_json
        diagnostics_topic: /diagnostics
        processing_time_topic: /blockpilot/arm/processing_time_ms
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .params import PARAM_DESCRIPTIONS, ModelParams, check_frame, check_topics, need

DEFAULT_ARM_NODE_NAME = "blockpilot_arm"
ARM_OUTPUT_KINDS = ("auto", "joint_trajectory", "pose_array")
ARM_DESCRIPTIONS = {
    **PARAM_DESCRIPTIONS,
    "max_input_age_ms": "largest |camera stamp - joint state stamp| (and wrist camera, ee pose) that still plans",
    "default_instruction": "instruction until one arrives on instruction_topic; empty: refuse to plan until then",
    "output_kind": "auto (by the schema: joint targets -> joint_trajectory, ee deltas -> pose_array) | "
                   "joint_trajectory (trajectory_msgs/JointTrajectory) | pose_array (geometry_msgs/PoseArray)",
    "output_frame": "frame id of the published trajectory and plan JSON",
    "gripper_frame": "frame id of end-effector poses published relative to the gripper (no fresh ee pose known)",
    "ee_delta_scale": "metres (radians) per unit of an ee-delta action's dx, dy, dz (droll, dpitch, dyaw)",
    "image_topic": "third-person camera (sensor_msgs/Image); every frame is planned once",
    "wrist_image_topic": "wrist camera (sensor_msgs/Image), the model's second image; empty: one camera",
    "ee_pose_topic": "current end-effector pose (geometry_msgs/PoseStamped) the ee deltas start from; empty: off",
}


@dataclass(frozen=True, slots=True)
class ArmParams(ModelParams):
    """Everything the arm node reads (see the module docstring); invalid values raise
    :class:`~blockpilot.ros_nodes.params.ParamsError` naming the field."""

    max_input_age_ms: float = 250.0
    default_instruction: str = ""
    output_kind: str = "auto"
    output_frame: str = "base_link"
    gripper_frame: str = "gripper"
    ee_delta_scale: float = 1.0
    image_topic: str = "/camera/scene/image_raw"
    wrist_image_topic: str = ""
    joint_state_topic: str = "/joint_states"
    instruction_topic: str = "/instruction"
    ee_pose_topic: str = ""
    trajectory_topic: str = "/blockpilot/arm/joint_trajectory"
    pose_array_topic: str = "/blockpilot/arm/ee_poses"
    plan_json_topic: str = "/blockpilot/arm/plan_json"
    diagnostics_topic: str = "/diagnostics"
    processing_time_topic: str = "/blockpilot/arm/processing_time_ms"
    camera_queue_depth: int = 5
    diagnostics_period_s: float = 1.0
    use_sim_time: bool = False

    def __post_init__(self) -> None:
        ModelParams.__post_init__(self)  # not super(): a slots dataclass is a new class object
        self._check_positive("max_input_age_ms", "ee_delta_scale", "diagnostics_period_s")
        need(self.output_kind in ARM_OUTPUT_KINDS, "output_kind",
             f"must be one of {ARM_OUTPUT_KINDS}, got {self.output_kind!r}")
        check_frame(self, "output_frame")
        check_frame(self, "gripper_frame")
        need(self.camera_queue_depth >= 1, "camera_queue_depth", f"must be at least 1, got {self.camera_queue_depth}")
        optional = ("wrist_image_topic", "ee_pose_topic")
        check_topics(self, (*optional, "image_topic", "joint_state_topic", "instruction_topic", "trajectory_topic",
                            "pose_array_topic", "plan_json_topic", "diagnostics_topic", "processing_time_topic"),
                     optional)

    @property
    def cameras(self) -> int:
        return 2 if self.wrist_image_topic else 1

    def descriptions(self) -> Mapping[str, str]:
        return ARM_DESCRIPTIONS

    def planner_options(self) -> dict[str, Any]:
        """As :meth:`ModelParams.planner_options`; a checkpoint is opened for :attr:`cameras` images."""
        options = ModelParams.planner_options(self)
        return options if self.bundle else {**options, "cameras": self.cameras}
