"""The SO-101 arm in MuJoCo (``lerobot-env-so101``) and its scripted expert, seeded and deterministic.

Two tasks, both from the package:

- ``pick_place``: ``SO101PickPlace-v0`` with the package's :class:`PickPlaceController` (hover, descend, close,
  lift, carry, lower, open). Success is the package's own: the block was lifted and rests on the goal.
- ``reach_close``: ``SO101PickCube-v0`` with the package's stateless ``scripted_reach_close``. It reaches the
  block and closes on it without lifting (the package's position-only IK cannot straddle the block), so its
  success is the package's ``is_reach_close_success``, not the environment's lift check.

The seed sets the block (and goal) position through the environment's own RNG; physics and the inverse kinematics
are deterministic, so one seed always gives the same frames and actions on one machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from blockpilot.errors import require_extra

from .gl import choose_gl_backend
from .types import RobotDataError, RobotEpisode

CAMERAS = ("front",)  # the scene's cameras (pick_scene.xml has one, facing the arm)
JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "grasp")
RENDER_QUALITIES = ("fast", "full")


@dataclass(frozen=True)
class TaskSpec:
    env_id: str
    instruction: str
    max_steps: int


TASKS = {
    "pick_place": TaskSpec("SO101PickPlace-v0", "pick up the cube and place it on the goal", 300),
    "reach_close": TaskSpec("SO101PickCube-v0", "reach the cube and close the gripper on it", 100),
}


@dataclass(frozen=True)
class ExpertConfig:
    """``render="fast"`` turns off shadows, reflections and multisampling: on a CPU (Mesa llvmpipe) MuJoCo's
    4096-pixel shadow map costs most of a frame whatever the image size. ``"full"`` keeps the scene's look."""

    task: str = "pick_place"
    image_size: int = 128
    render: str = "fast"
    cameras: tuple[str, ...] = CAMERAS
    max_steps: int | None = None  # None: the task's own limit

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise RobotDataError(f"task {self.task!r} is not one of {sorted(TASKS)}")
        if self.render not in RENDER_QUALITIES:
            raise RobotDataError(f"render {self.render!r} is not one of {RENDER_QUALITIES}")
        if not 16 <= self.image_size <= 1024:
            raise RobotDataError(f"image_size must be in [16, 1024], got {self.image_size}")
        unknown = sorted(set(self.cameras) - set(CAMERAS))
        if unknown or not self.cameras:
            raise RobotDataError(f"cameras {list(self.cameras)}: each must be one of {list(CAMERAS)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise RobotDataError(f"max_steps must be at least 1, got {self.max_steps}")

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]


def _so101() -> Any:
    require_extra("lerobot_env_so101", "robot", "the SO-101 simulator")
    choose_gl_backend()
    import lerobot_env_so101

    return lerobot_env_so101


class _Camera:
    """Our own offscreen renderer over the environment's model, so size and quality are ours to set."""

    def __init__(self, env: Any, config: ExpertConfig) -> None:
        import mujoco

        self._mujoco = mujoco
        if config.render == "fast":
            env.model.vis.quality.offsamples = 0
        env.model.vis.global_.offwidth = max(env.model.vis.global_.offwidth, config.image_size)
        env.model.vis.global_.offheight = max(env.model.vis.global_.offheight, config.image_size)
        self._renderer = mujoco.Renderer(env.model, height=config.image_size, width=config.image_size)
        if config.render == "fast":
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def frame(self, data: Any, camera: str) -> np.ndarray:
        self._renderer.update_scene(data, camera=camera)
        return np.array(self._renderer.render(), dtype=np.uint8, copy=True)

    def close(self) -> None:
        self._renderer.close()


def _ee_pose(env: Any, mujoco: Any) -> np.ndarray:
    site = env.model.site("gripperframe").id
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, env.data.site_xmat[site])
    return np.concatenate([env.data.site_xpos[site], quat]).astype(np.float32)


def _make(config: ExpertConfig, seed: int) -> tuple[Any, Callable[[dict[str, Any]], np.ndarray],
                                                     Callable[[dict[str, Any], dict[str, Any]], bool]]:
    """The environment, the expert (observation -> action) and the success check (observation, info -> bool)."""
    so101 = _so101()
    from lerobot_env_so101.policy import DEFAULT_ACTION_SCALE
    from lerobot_env_so101.scripted import PickPlaceController, is_reach_close_success, scripted_reach_close

    kwargs = {"seed": seed, "random_block_position": True, "action_scale": DEFAULT_ACTION_SCALE}
    if config.task == "pick_place":
        env = so101.SO101PickPlaceGymEnv(**kwargs)
        controller = PickPlaceController(DEFAULT_ACTION_SCALE)

        def pick_place(obs: dict[str, Any]) -> np.ndarray:
            block = np.array(env.data.sensor("block_pos").data, dtype=np.float64)
            return np.asarray(controller.act(env.ik_point_pos, block, env.goal_pos))

        return env, pick_place, lambda obs, info: bool(info.get("succeed", False))
    env = so101.SO101PickCubeGymEnv(**kwargs)

    def flat(obs: dict[str, Any]) -> np.ndarray:
        return np.concatenate([obs["agent_pos"], obs["environment_state"]])

    return (env, lambda obs: np.asarray(scripted_reach_close(flat(obs), DEFAULT_ACTION_SCALE)),
            lambda obs, info: is_reach_close_success(flat(obs)))


def _environment_state(env: Any, config: ExpertConfig) -> np.ndarray:
    block = np.array(env.data.sensor("block_pos").data, dtype=np.float32)
    return np.concatenate([block, np.asarray(env.goal_pos, np.float32)]) if config.task == "pick_place" else block


def run_expert_episode(seed: int, config: ExpertConfig | None = None) -> RobotEpisode:
    """Run the task's scripted expert from ``seed`` until success or the step limit, recording every step."""
    config = config or ExpertConfig()
    if seed < 0:
        raise RobotDataError(f"seed must be non-negative, got {seed}")
    env, expert, succeeded = _make(config, seed)
    import mujoco

    camera = _Camera(env, config)
    rows: dict[str, list[Any]] = {k: [] for k in ("joint", "ee", "env", "action", "success")}
    frames: dict[str, list[np.ndarray]] = {name: [] for name in config.cameras}
    joints = [env.model.joint(name).qposadr[0] for name in JOINT_NAMES]
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(config.max_steps or config.spec.max_steps):
            for name in config.cameras:
                frames[name].append(camera.frame(env.data, name))
            rows["joint"].append(np.asarray(env.data.qpos[joints], dtype=np.float32))
            rows["ee"].append(_ee_pose(env, mujoco))
            rows["env"].append(_environment_state(env, config))
            action = np.asarray(expert(obs), dtype=np.float32)
            obs, _, terminated, truncated, info = env.step(action)
            done = succeeded(obs, info)
            rows["action"].append(action)
            rows["success"].append(done)
            if done or terminated or truncated:
                break
    finally:
        camera.close()
        env.close()
    return RobotEpisode(
        seed=seed, task=config.spec.env_id, instruction=config.spec.instruction,
        fps=round(1.0 / env.control_dt), images={k: np.stack(v) for k, v in frames.items()},
        joint_names=JOINT_NAMES, joint_state=np.stack(rows["joint"]), ee_pose=np.stack(rows["ee"]),
        environment_state=np.stack(rows["env"]), action_names=ACTION_NAMES, actions=np.stack(rows["action"]),
        success=np.asarray(rows["success"], dtype=bool))
