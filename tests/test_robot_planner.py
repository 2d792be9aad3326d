"""Manipulation planning: action-chunk schemas, the robot prompt, scaffold == AR, rollouts, ONNX Runtime, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import reference

from blockpilot.cli import main
from blockpilot.demo import road_image
from blockpilot.runtime.decoders import Decoded
from blockpilot.runtime.plan_types import DecoderSettings, Observation, ObservationError, RobotObservation
from blockpilot.runtime.planner import Planner
from blockpilot.vla.plans import ActionChunkPlan, ActionChunkSchema, render_plan
from blockpilot.vla.prompt import (
    ROBOT_SYSTEM_PROMPT,
    EgoState,
    chat_prompt_ids,
    robot_instruction,
    robot_prompt_ids,
)
from blockpilot.vla.schema import SchemaError
from blockpilot.vla.schema_io import load_schema, resolve_schema, save_schema
from blockpilot.vla.slots import FixedNumber

pytestmark = pytest.mark.usefixtures("one_thread")

STATE = [0.1, -0.2, 0.3, 0.0, 1.2, 0.5]
INSTRUCTION = "Pick up the red cube and put it in the bowl."


def _obs(**change: Any) -> RobotObservation:
    parts: dict[str, Any] = {"images": [road_image(112), road_image(112)], "instruction": INSTRUCTION,
                             "state": STATE}
    return RobotObservation(**{**parts, **change})


def _chunk(schema: ActionChunkSchema, shift: float = 0.0) -> ActionChunkPlan:
    steps, dims = schema.steps, len(schema.dims)
    values = np.linspace(-1, 1, steps * dims).reshape(steps, dims) + shift
    return ActionChunkPlan(np.round(values, schema.frac_digits), schema.dims)


@pytest.fixture(scope="module")
def planners() -> dict[str, Planner]:
    model, tokenizer = reference(0)
    return {name: Planner.from_model(model, tokenizer, schema=ActionChunkSchema.so101_joints(), cameras=2,
                                     decoder=DecoderSettings(name=name)) for name in ("ar", "scaffold", "rollouts")}


@pytest.fixture(scope="module")
def plans(planners: dict[str, Planner]) -> dict[str, Any]:
    return {name: p.plan(_obs()) for name, p in planners.items()}


def test_presets_round_trip_through_scaffold_and_blockpilot_json(tmp_path: Path) -> None:
    _, tokenizer = reference(0)
    from blockpilot.vla.scaffold import build_scaffold

    for name, steps, dims in (("so101-joints", 8, 6), ("ee-delta", 8, 7), ("so101-ee", 8, 4)):
        schema = resolve_schema(None, name)
        assert isinstance(schema, ActionChunkSchema) and (schema.steps, len(schema.dims)) == (steps, dims)
        chunk = _chunk(schema)
        back = build_scaffold(schema, tokenizer).decode_plan(build_scaffold(schema, tokenizer).encode_plan(chunk))
        np.testing.assert_array_equal(back.actions, chunk.actions)
        assert back.actions.shape == (steps, dims) and back.dims == schema.dims
        save_schema(tmp_path / name, schema)
        assert load_schema(tmp_path / name) == schema
    assert render_plan(ActionChunkSchema.ee_delta(), _chunk(ActionChunkSchema.ee_delta())).startswith(
        '{"actions":[[-1.000,-0.964,')
    for bad in ({"steps": 0}, {"action": "torques"}, {"dims": ("a", "a")}, {"dims": ()}, {"rate_hz": 0}):
        with pytest.raises(SchemaError):
            ActionChunkSchema(**bad)
    with pytest.raises(SchemaError, match="dims"):
        ActionChunkSchema.so101_joints().sections_from_plan(_chunk(ActionChunkSchema.ee_delta()))


def test_robot_prompt_writes_the_state_in_the_answer_width() -> None:
    text = robot_instruction(INSTRUCTION, [0.1, -0.2, 12.0], FixedNumber(1, 3), cameras=2, gripper=0.25)
    assert text == ("Cameras: third-person, wrist. Task: Pick up the red cube and put it in the bowl. "
                    "Robot state [+0.100,-0.200,+9.999]. Gripper +0.250. Plan the next actions.")
    _, tokenizer = reference(0)
    ids = robot_prompt_ids(tokenizer, FixedNumber(1, 3), INSTRUCTION, STATE, [4])
    text = robot_instruction(INSTRUCTION, STATE, FixedNumber(1, 3), cameras=1)
    assert ids == chat_prompt_ids(tokenizer, ROBOT_SYSTEM_PROMPT, text, [4]) and "wrist" not in text


def test_scaffold_equals_ar_token_for_token_on_the_robot_schema(planners: dict[str, Planner],
                                                                 plans: dict[str, Any]) -> None:
    ar, fast = plans["ar"], plans["scaffold"]
    np.testing.assert_array_equal(ar.tokens, fast.tokens)
    assert ar.text == fast.text and ar.stats.forwards == len(planners["ar"].scaffold)
    assert fast.stats.image_tokens == 32 and fast.stats.constrained  # two cameras, typed number slots
    assert fast.ok and fast.actions is not None and fast.actions.shape == (8, 6) and fast.waypoints is None
    np.testing.assert_array_equal(fast.actions, ar.actions)
    out = fast.to_dict()
    assert np.array_equal(out["actions"], fast.actions) and out["action_dims"][-1] == "gripper"
    assert np.abs(fast.actions).max() <= 9.999


def test_rollouts_give_n_chunks_their_mean_and_per_step_spread(planners: dict[str, Planner],
                                                               plans: dict[str, Any]) -> None:
    plan = plans["rollouts"]
    assert plan.tokens.shape == (4, len(planners["rollouts"].scaffold)) and plan.stats.rows == 4
    chunks = np.stack([p.actions for p in plan.rollout_plans if p is not None])
    assert plan.spread is not None and plan.spread.count == len(chunks) >= 1
    np.testing.assert_allclose(plan.actions, chunks.mean(axis=0))
    assert plan.spread.std.shape == (8,) and plan.to_dict()["rollouts"]["parsed"] == len(chunks)
    # Exact mean and spread on known chunks (one row that does not parse is left out).
    planner = planners["rollouts"]
    schema = planner.schema
    known = [_chunk(schema, s) for s in (0.0, 0.5, -0.25)]
    rows = [planner.scaffold.encode_plan(c) for c in known] + [planner.scaffold.token_ids.copy()]
    made = planner.finish(Decoded(np.stack(rows), 20, 50, 1, "scaffold"), {})
    stack = np.stack([c.actions for c in known])
    dist = np.linalg.norm(stack - stack.mean(axis=0), axis=-1)
    np.testing.assert_allclose(made.actions, stack.mean(axis=0))
    assert made.spread is not None and made.spread.count == 3
    np.testing.assert_allclose(made.spread.std, np.sqrt((dist**2).mean(axis=0)))
    np.testing.assert_allclose(made.spread.max_deviation, dist.max(axis=0))


@pytest.mark.parametrize("change, match", [
    ({"instruction": "  "}, "instruction is empty"),
    ({"state": [0.1, 0.2]}, "has 2 value"),
    ({"state": [0.1, 0.2, 0.3, 0.4, 0.5], "gripper": float("nan")}, "non-finite"),
    ({"state": [[0.1] * 6]}, "flat list"),
    ({"state": "up"}, "list of numbers"),
    ({"images": []}, "no camera image"),
])
def test_bad_robot_observation_is_a_typed_error(change: dict[str, Any], match: str,
                                                planners: dict[str, Planner]) -> None:
    with pytest.raises(ObservationError, match=match):
        planners["scaffold"].plan(_obs(**change))
    # Five joints plus a separate gripper value is the same six-value state.
    ok = planners["scaffold"].prompt(_obs(state=STATE[:5], gripper=0.5))
    assert ok[1] == 32


def test_layouts_and_observations_must_match(planners: dict[str, Planner]) -> None:
    ego = EgoState(np.array([[-7.5, 0.0], [-5.0, 0.0], [-2.5, 0.0], [0.0, 0.0]]), 5.0, 0.0)
    with pytest.raises(ObservationError, match="RobotObservation"):
        planners["scaffold"].plan(Observation([road_image(112)], ego, "go straight"))
    with pytest.raises(ObservationError, match="plan_robot takes a RobotObservation"):
        planners["scaffold"].plan_robot(Observation([road_image(112)], ego, "go straight"))  # type: ignore[arg-type]
    model, tokenizer = reference(0)
    driving = Planner.from_model(model, tokenizer)
    with pytest.raises(ObservationError, match="action-chunk schema"):
        driving.plan_robot(_obs())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockpilot.vla.reference_model import write_reference_checkpoint

    root = tmp_path_factory.mktemp("robot_cli")
    scene, wrist = root / "scene.png", root / "wrist.png"
    Image.fromarray(road_image(112)).save(scene)
    Image.fromarray(road_image(112)[::-1].copy()).save(wrist)
    return {"ckpt": write_reference_checkpoint(root / "ckpt"), "scene": scene, "wrist": wrist, "root": root}


def _plan_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["plan", *argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_plans_an_action_chunk_and_an_exported_bundle_plans_the_same(files: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from blockpilot.export.bundle_export import export_bundle

    images = f"{files['scene']},{files['wrist']}"
    args = ["--image", images, "--instruction", INSTRUCTION, "--state", json.dumps(STATE), "--schema", "so101-joints"]
    rc, out, err = _plan_cli(capsys, "--checkpoint", str(files["ckpt"]), *args)
    plan = json.loads(out)
    assert rc == 0, err
    assert np.asarray(plan["actions"]).shape == (8, 6) and plan["stats"]["image_tokens"] == 32
    bundle = export_bundle(files["ckpt"], tmp_path / "bundle", schema="so101-joints").bundle
    rc, out, err = _plan_cli(capsys, "--checkpoint", str(bundle), *args[:-2])
    assert rc == 0, err
    assert json.loads(out)["actions"] == plan["actions"] and json.loads(out)["text"] == plan["text"]


@pytest.mark.parametrize("argv, needle", [
    (["--state", "[0.1]"], "--state goes with --instruction"),
    (["--instruction", "pick"], "--instruction needs --state"),
    (["--instruction", "pick", "--state", "[0.1, 0.2]", "--schema", "so101-joints"], "--state: "),
    (["--instruction", "pick", "--state", "{\"joint\": [1]}", "--schema", "so101-joints"], "--state: expected keys"),
    (["--instruction", "pick", "--state", "nofile.json", "--schema", "so101-joints"], "--state: 'nofile.json'"),
    (["--instruction", "pick", "--state", "[0.1]", "--schema", "driving-nuscenes"], "--schema driving-nuscenes"),
    (["--instruction", "pick", "--state", "[0.1]", "--prompt", "x"], "--instruction and --prompt are alternatives"),
])
def test_cli_bad_robot_invocation_is_one_line_naming_the_flag(argv: list[str], needle: str, files: dict[str, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _plan_cli(capsys, "--checkpoint", str(files["ckpt"]), "--image", str(files["scene"]), *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
