from __future__ import annotations

import numpy as np
import pytest

from blockpilot.vla.prompt import (
    DRIVING_SYSTEM_PROMPT,
    EgoState,
    PromptInputError,
    chat_prompt_ids,
    driving_instruction,
)
from blockpilot.vla.reference_tokenizer import IM_START_TEXT, build_reference_tokenizer
from blockpilot.vla.slots import FixedNumber


@pytest.fixture(scope="module")
def tokenizer():
    return build_reference_tokenizer()[0]


def _ego() -> EgoState:
    return EgoState(past_waypoints=np.array([[-3.0, 0.1], [-1.5, 0.05]]), speed_mps=3.0, accel_mps2=-0.25)


def test_instruction_uses_fixed_width_numbers() -> None:
    text = driving_instruction(_ego(), "turn left")
    assert "Ego speed +03.00 m/s, acceleration -00.25 m/s2." in text
    assert "Past trajectory [[-03.00,+00.10],[-01.50,+00.05]]" in text
    assert text.endswith("Route command: turn left. Plan the future trajectory.")
    # Values past the number width are clipped rather than rejected: a fast car still gets a prompt.
    fast = EgoState(past_waypoints=np.zeros((1, 2)), speed_mps=250.0, accel_mps2=0.0)
    assert "+99.99" in driving_instruction(fast, "go straight")
    assert "+250.00" in driving_instruction(fast, "go straight", FixedNumber(3, 2))


def test_prompt_layout_and_image_placeholders(tokenizer) -> None:
    special = tokenizer.special
    ids = chat_prompt_ids(tokenizer, DRIVING_SYSTEM_PROMPT, "hello", [4, 2])
    assert ids[0] == tokenizer.token_to_id(IM_START_TEXT)
    assert ids.count(special.image) == 6
    first = ids.index(special.vision_start)
    assert ids[first: first + 6] == [special.vision_start, *[special.image] * 4, special.vision_end]
    text = tokenizer.decode(ids)
    assert text.startswith(f"{IM_START_TEXT}system\n{DRIVING_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("hello<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EgoState(np.zeros((3,)), 1.0, 0.0), "past_waypoints"),
        (lambda: EgoState(np.zeros((2, 2)), float("nan"), 0.0), "non-finite"),
        (lambda: driving_instruction(_ego(), "fly"), "route_command"),
    ],
)
def test_bad_inputs_raise_prompt_error(make, match) -> None:
    with pytest.raises(PromptInputError, match=match):
        make()


def test_zero_image_tokens_rejected(tokenizer) -> None:
    with pytest.raises(PromptInputError, match="image tokens"):
        chat_prompt_ids(tokenizer, "s", "u", [0])


@pytest.mark.parametrize("schema", ["nuscenes", "wod_e2e"])
def test_planner_training_data_and_demo_build_one_driving_prompt(schema: str) -> None:
    """One driving_prompt_ids: the planner's prompt of the demo's observation is the training example's prompt of
    the same keyframe, token for token, and both write the numbers in the schema's format (WOD-E2E: three
    integer digits, where the demo's old copy of the prompt wrote nuScenes' two whatever the schema)."""
    from types import SimpleNamespace

    from blockpilot.demo import demo_observation
    from blockpilot.runtime.planner import Planner
    from blockpilot.train.data import prompt_ids
    from blockpilot.vla.plans import DrivingSchema
    from blockpilot.vla.reference_model import SHIPPED_MODEL

    driving = getattr(DrivingSchema, schema)()
    planner = Planner.from_checkpoint(SHIPPED_MODEL, schema=driving)
    observation = demo_observation(112)
    prompt, image_tokens = planner.prompt(observation)
    ego = observation.ego
    keyframe = SimpleNamespace(past_xy=ego.past_waypoints, speed=ego.speed_mps, accel=ego.accel_mps2,
                               route_command=observation.route_command)
    np.testing.assert_array_equal(prompt_ids(keyframe, planner.tokenizer, driving, image_tokens), prompt.token_ids)
    text = planner.tokenizer.decode(prompt.token_ids.tolist())
    speed = FixedNumber(driving.int_digits, driving.frac_digits).format_value(ego.speed_mps, "speed")
    assert f"Ego speed {speed} m/s" in text
    assert ("+005.00" in text) == (schema == "wod_e2e")
