from __future__ import annotations

import numpy as np
import pytest

from blockpilot.vla.prompt import (
    DRIVING_SYSTEM_PROMPT,
    EgoState,
    PromptError,
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
    with pytest.raises(PromptError, match=match):
        make()


def test_zero_image_tokens_rejected(tokenizer) -> None:
    with pytest.raises(PromptError, match="image tokens"):
        chat_prompt_ids(tokenizer, "s", "u", [0])
