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

CAMERAS = ("front", "wrist")  # front: the scene's own camera, facing the arm; wrist: ours, on the gripper
DEFAULT_CAMERAS = ("front",)  # what the demonstrations and the shipped robot model use
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
    cameras: tuple[str, ...] = DEFAULT_CAMERAS  # in prompt order
    max_steps: int | None = None  # None: the task's own limit

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise RobotDataError(f"task {self.task!r} is not one of {sorted(TASKS)}")
        if self.render not in RENDER_QUALITIES:
            raise RobotDataError(f"render {self.render!r} is not one of {RENDER_QUALITIES}")
        if not 16 <= self.image_size <= 1024:
            raise RobotDataError(f"image_size must be in [16, 1024], got {self.image_size}")
        unknown = sorted(set(self.cameras) - set(CAMERAS))
        if unknown or not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise RobotDataError(f"cameras {list(self.cameras)}: each must be one of {list(CAMERAS)}, once")
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


# The wrist camera, in the gripperframe site's axes (x along the jaws towards the tips, y out of the plane the
# jaws open in): mounted 6 cm back from the grasp point and 4 cm off the jaws' plane, it looks at a point 2 cm past
# the grasp point, so the fingertips sit at the bottom of the frame and a block between them at its centre.
WRIST_MOUNT = (-0.06, -0.04, 0.0)
WRIST_AIM = (0.02, 0.0, 0.0)
WRIST_FOVY = 70.0  # degrees, vertical; a wide lens as on wrist-mounted cameras


class _Camera:
    """Our own offscreen renderer over the environment's model, so size and quality are ours to set.

    ``front`` is the scene's fixed camera. ``wrist`` is not in the model: each frame the scene is built as for
    ``front`` and then its OpenGL camera (position, forward, up and frustum, both eyes) is replaced by the wrist
    pose computed from the ``gripperframe`` site, so it follows the gripper in position and roll. A free
    ``MjvCamera`` cannot do this (it has no roll and is undefined looking straight down, the expert's grasp pose),
    and adding a camera through ``MjSpec`` means recompiling the model the environment owns and swapping its model
    and data behind its back."""

    def __init__(self, env: Any, config: ExpertConfig) -> None:
        import mujoco
        from lerobot_env_so101.mujoco_env import grasp_point_offset

        self._mujoco = mujoco
        if config.render == "fast":
            env.model.vis.quality.offsamples = 0
        env.model.vis.global_.offwidth = max(env.model.vis.global_.offwidth, config.image_size)
        env.model.vis.global_.offheight = max(env.model.vis.global_.offheight, config.image_size)
        self._renderer = mujoco.Renderer(env.model, height=config.image_size, width=config.image_size)
        if config.render == "fast":
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._site = env.model.site("gripperframe").id
        grasp = grasp_point_offset(env.model, self._site)  # the point between the jaws, in the site's axes
        self._wrist_pos = grasp + np.asarray(WRIST_MOUNT)
        self._wrist_aim = grasp + np.asarray(WRIST_AIM)

    def frame(self, data: Any, camera: str) -> np.ndarray:
        if camera == "wrist":
            self._renderer.update_scene(data, camera="front")
            self._place_wrist(data)
        else:
            self._renderer.update_scene(data, camera=camera)
        return np.array(self._renderer.render(), dtype=np.uint8, copy=True)

    def _place_wrist(self, data: Any) -> None:
        rotation = np.asarray(data.site_xmat[self._site]).reshape(3, 3)
        origin = np.asarray(data.site_xpos[self._site])
        pos = origin + rotation @ self._wrist_pos
        forward = rotation @ (self._wrist_aim - self._wrist_pos)
        forward /= np.linalg.norm(forward)
        up = rotation @ np.array([0.0, -1.0, 0.0])  # away from the jaws: the fingertips at the frame's bottom
        up -= forward * float(up @ forward)
        up /= np.linalg.norm(up)
        for gl_camera in self._renderer.scene.camera:  # two eyes; a mono render averages them
            gl_camera.pos[:], gl_camera.forward[:], gl_camera.up[:] = pos, forward, up
            half = gl_camera.frustum_near * np.tan(np.radians(WRIST_FOVY) / 2.0)
            gl_camera.frustum_bottom, gl_camera.frustum_top = -half, half
            gl_camera.frustum_center = 0.0

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


class SimSession:
    """One seeded episode of a task: its environment (reset), our camera, the task's expert and success check.

    The expert recording (:func:`run_expert_episode`) and the closed loop
    (:func:`~blockpilot.sim.robot.closed_loop.run_closed_loop_episode`) both step through one of these, so the two
    see the same scene, frames and success. Use it as a context manager (it closes the renderer and the env)."""

    def __init__(self, config: ExpertConfig, seed: int) -> None:
        if seed < 0:
            raise RobotDataError(f"seed must be non-negative, got {seed}")
        self.config, self.seed = config, seed
        self.env, self._expert, self._succeeded = _make(config, seed)  # picks the GL backend before MuJoCo loads
        import mujoco

        try:
            self.camera = _Camera(self.env, config)
        except BaseException:
            self.env.close()
            raise
        self._mujoco = mujoco
        model = self.env.model
        self._joints = [model.joint(name).qposadr[0] for name in JOINT_NAMES]
        self._floor = model.geom("floor").id
        shoulder = model.body("shoulder").id
        self._arm_bodies = frozenset(b for b in range(model.nbody) if _descends(model, b, shoulder))
        self.obs, _ = self.env.reset(seed=seed)

    def reset(self, seed: int) -> None:
        """Start the episode of ``seed`` in this session's environment (what a fresh session of ``seed`` sees,
        without building the environment and the renderer again)."""
        self.seed = seed
        self.obs, _ = self.env.reset(seed=seed)

    @property
    def step_limit(self) -> int:
        return self.config.max_steps or self.config.spec.max_steps

    @property
    def fps(self) -> int:
        return round(1.0 / self.env.control_dt)

    @property
    def instruction(self) -> str:
        return self.config.spec.instruction

    def frames(self) -> dict[str, np.ndarray]:
        """Each configured camera's frame now, ``(H, W, 3)`` uint8."""
        return {name: self.camera.frame(self.env.data, name) for name in self.config.cameras}

    def joint_state(self) -> np.ndarray:
        """The six joint positions (radians, the gripper last): the ``state`` a policy is given."""
        return np.asarray(self.env.data.qpos[self._joints], dtype=np.float32)

    def ee_pose(self) -> np.ndarray:
        return _ee_pose(self.env, self._mujoco)

    def environment_state(self) -> np.ndarray:
        block = np.array(self.env.data.sensor("block_pos").data, dtype=np.float32)
        if self.config.task == "pick_place":
            return np.concatenate([block, np.asarray(self.env.goal_pos, np.float32)])
        return block

    def expert_action(self) -> np.ndarray:
        return np.asarray(self._expert(self.obs), dtype=np.float32)

    def gripper_command(self) -> float:
        """The grasp command the gripper actuator holds now, in action units (0 closed, 1 open)."""
        from lerobot_env_so101.gripper import ctrl_to_normalized

        actuator = self.env.model.actuator("gripper")
        return float(ctrl_to_normalized(self.env.data.ctrl[actuator.id], actuator.ctrlrange))

    def block_distance(self) -> float:
        """Metres from the block to its target: the goal (in the plane) for ``pick_place``, the gripper's grasp
        point for ``reach_close``."""
        block = np.array(self.env.data.sensor("block_pos").data, dtype=np.float64)
        if self.config.task == "pick_place":
            return float(np.linalg.norm(block[:2] - np.asarray(self.env.goal_pos, np.float64)[:2]))
        return float(np.linalg.norm(block - np.asarray(self.env.ik_point_pos, np.float64)))

    def arm_touches_floor(self) -> bool:
        """Whether a link of the arm (the shoulder and everything it carries) is in contact with the table."""
        data, model = self.env.data, self.env.model
        for k in range(data.ncon):
            pair = (int(data.contact.geom1[k]), int(data.contact.geom2[k]))
            if self._floor in pair:
                other = pair[1] if pair[0] == self._floor else pair[0]
                if int(model.geom_bodyid[other]) in self._arm_bodies:
                    return True
        return False

    def step(self, action: np.ndarray) -> tuple[bool, bool]:
        """Apply one action; (the task's success check after it, whether the environment ended the episode)."""
        self.obs, _, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float32))
        return bool(self._succeeded(self.obs, info)), bool(terminated or truncated)

    def close(self) -> None:
        self.camera.close()
        self.env.close()

    def __enter__(self) -> SimSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _descends(model: Any, body: int, ancestor: int) -> bool:
    while body != ancestor and body != 0:
        body = int(model.body_parentid[body])
    return body == ancestor


def run_expert_episode(seed: int, config: ExpertConfig | None = None) -> RobotEpisode:
    """Run the task's scripted expert from ``seed`` until success or the step limit, recording every step."""
    config = config or ExpertConfig()
    rows: dict[str, list[Any]] = {k: [] for k in ("joint", "ee", "env", "action", "success")}
    frames: dict[str, list[np.ndarray]] = {name: [] for name in config.cameras}
    with SimSession(config, seed) as sim:
        for _ in range(sim.step_limit):
            for name, frame in sim.frames().items():
                frames[name].append(frame)
            rows["joint"].append(sim.joint_state())
            rows["ee"].append(sim.ee_pose())
            rows["env"].append(sim.environment_state())
            action = sim.expert_action()
            done, ended = sim.step(action)
            rows["action"].append(action)
            rows["success"].append(done)
            if done or ended:
                break
    return RobotEpisode(
        seed=seed, task=config.spec.env_id, instruction=config.spec.instruction,
        fps=sim.fps, images={k: np.stack(v) for k, v in frames.items()},
        joint_names=JOINT_NAMES, joint_state=np.stack(rows["joint"]), ee_pose=np.stack(rows["ee"]),
        environment_state=np.stack(rows["env"]), action_names=ACTION_NAMES, actions=np.stack(rows["action"]),
        success=np.asarray(rows["success"], dtype=bool))
