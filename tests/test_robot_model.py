"""The SO-101 manipulation model shipped in models/robot-so101: it loads through open_planner, plans a valid
so101-ee-block chunk (state: the six joints and the block's offset from the gripper point) for a rendered simulator
frame with scaffold and ar alike, and its data card states the train log's numbers."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest

from blockpilot.runtime.plan_types import DecoderSettings, RobotObservation
from blockpilot.runtime.sources import open_planner
from blockpilot.sim.robot.so101 import TASKS, ExpertConfig, run_expert_episode
from blockpilot.vla.plans import ActionChunkSchema
from blockpilot.vla.reference_model import SHIPPED_ROBOT_MODEL
from blockpilot.vla.robot_state import compose_state
from blockpilot.vla.schema_io import load_schema

HELD_OUT_SEED = 1_000_000  # the first held-out episode of the data card


@lru_cache(maxsize=1)
def _first_frame() -> tuple[np.ndarray, np.ndarray]:
    episode = run_expert_episode(HELD_OUT_SEED, ExpertConfig(task="reach_close", image_size=112, max_steps=1))
    schema = load_schema(SHIPPED_ROBOT_MODEL)
    assert isinstance(schema, ActionChunkSchema)
    joints = dict(zip(episode.joint_names, episode.joint_state[0].tolist(), strict=True))
    state = compose_state(schema.state_dims, joints, environment_state=episode.environment_state[0],
                          ee_pose=episode.ee_pose[0])
    return episode.images["front"][0], state


def _log() -> dict:
    return json.loads((SHIPPED_ROBOT_MODEL / "train_log.json").read_text())


def test_shipped_robot_checkpoint_is_small_and_complete() -> None:
    names = {p.name for p in SHIPPED_ROBOT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "blockpilot.json", "preprocessor_config.json",
            "DATA_CARD.md", "train_log.json"} <= names
    assert (SHIPPED_ROBOT_MODEL / "model.safetensors").stat().st_size <= 20 * 2**20


def test_shipped_robot_model_plans_a_sim_frame_with_scaffold_and_ar_alike() -> None:
    image, state = _first_frame()
    observation = RobotObservation(images=[image], instruction=TASKS["reach_close"].instruction, state=state)
    plans = {name: open_planner(SHIPPED_ROBOT_MODEL, decoder=DecoderSettings(name=name)).plan_robot(observation)
             for name in ("scaffold", "ar")}
    scaffold, ar = plans["scaffold"], plans["ar"]
    assert scaffold.error is None and scaffold.plan is not None
    schema = ActionChunkSchema.so101_ee_block()
    assert load_schema(SHIPPED_ROBOT_MODEL) == schema
    actions = np.asarray(scaffold.plan.actions)
    assert actions.shape == (schema.steps, len(schema.dims)) and np.isfinite(actions).all()
    assert np.abs(actions).max() <= 9.99
    assert scaffold.text == ar.text  # token for token the AR baseline's answer
    assert scaffold.stats.forwards < ar.stats.forwards


def test_data_card_states_the_train_log_numbers() -> None:
    log, card = _log(), (SHIPPED_ROBOT_MODEL / "DATA_CARD.md").read_text()
    metrics = log["metrics"]
    assert f"final training loss (mean of the last steps): {metrics['final_train_loss']:.4f}" in card
    assert json.dumps(metrics["final_eval"]) in card
    assert f"{metrics['steps']} steps x batch {metrics['batch']}" in card
    assert f"--train-seeds {log['train_seeds']} --eval-seeds {log['eval_seeds']}" in card
    assert "--schema so101-ee-block" in card and "privileged simulator state" in card  # says what it reads
    replay = log["results"]["replay"]
    assert f"action L1 model {replay['model_l1']} vs repeat-last-action {replay['baseline_l1']}" in card
    for name, value in log["results"].items():
        if "ablation_of" in value:  # another model's results: its replay reduction and closed-loop success
            model = value["closed_loop"]["policies"]["model"]
            assert f"reduction {100 * value['replay']['l1_reduction']:.1f} %); closed-loop success " \
                   f"{model['succeeded']}/{model['episodes']}" in card, name
        elif name != "replay":
            assert json.dumps(value) in card, name


@pytest.mark.parametrize("name", ["replay", "closed_loop"])
def test_held_out_results_are_recorded(name: str) -> None:
    assert name in _log()["results"]
