"""What the scripted expert records (:class:`RobotEpisode`) and what a replay source yields (:class:`RobotSample`).

Units: joint positions in radians (the gripper joint too), end-effector pose as position in metres then a unit
quaternion (w, x, y, z) in the world frame, actions in the environment's native units (``[dx, dy, dz, grasp]``:
position deltas in action units of ``action_scale`` metres each, grasp an absolute target, 0 closed, 1 open).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from blockpilot.errors import BlockpilotError

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]


class RobotDataError(BlockpilotError, ValueError):
    """A robot episode or dataset that cannot be used as it is; the message names the file or field."""


@dataclass(frozen=True, eq=False)
class RobotEpisode:
    """One expert episode of T steps. Row t holds the observation before action t and ``success[t]`` after it."""

    seed: int
    task: str  # the environment id, e.g. "SO101PickPlace-v0"
    instruction: str  # the language instruction a policy is given
    fps: int
    images: dict[str, ImageArray]  # camera name -> (T, H, W, 3) uint8
    joint_names: tuple[str, ...]
    joint_state: FloatArray  # (T, J) joint positions
    ee_pose: FloatArray  # (T, 7): x, y, z, qw, qx, qy, qz
    environment_state: FloatArray  # (T, E): the block position (then the goal position where the task has one)
    action_names: tuple[str, ...]
    actions: FloatArray  # (T, A)
    success: npt.NDArray[np.bool_]  # (T,) the task's success check after action t

    def __post_init__(self) -> None:
        steps = len(self.actions)
        if steps == 0:
            raise RobotDataError(f"episode of seed {self.seed} has no step")
        arrays = {"joint_state": self.joint_state, "ee_pose": self.ee_pose,
                  "environment_state": self.environment_state, "success": self.success,
                  **{f"images[{k}]": v for k, v in self.images.items()}}
        for name, arr in arrays.items():
            if len(arr) != steps:
                raise RobotDataError(f"episode of seed {self.seed}: {name} has {len(arr)} rows, actions {steps}")
        if self.joint_state.shape[1] != len(self.joint_names) or self.actions.shape[1] != len(self.action_names):
            raise RobotDataError(f"episode of seed {self.seed}: joint_state/actions columns do not match their names")

    @property
    def length(self) -> int:
        return len(self.actions)

    @property
    def succeeded(self) -> bool:
        return bool(self.success.any())


@dataclass(frozen=True, eq=False)
class RobotSample:
    """One replayed frame: what a manipulation planner is given, and the next K actions as its target chunk.

    ``actions[k]`` is the action at frame ``frame_index + k`` of the same episode. Past the episode's end the chunk
    repeats the episode's last action and ``action_pad[k]`` is True (LeRobot's own padding), so a loss or a metric
    masks those rows instead of scoring invented motion.
    """

    episode_index: int
    frame_index: int
    instruction: str
    images: dict[str, ImageArray]  # camera name -> (H, W, 3) uint8
    state: FloatArray  # (J,) proprioceptive state
    actions: FloatArray  # (K, A)
    action_pad: npt.NDArray[np.bool_]  # (K,)
    ee_pose: FloatArray | None = None  # (7,) where the dataset has it
    environment_state: FloatArray | None = None  # (E,) the block position first, where the dataset has it
