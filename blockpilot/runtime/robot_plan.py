"""Manipulation planning: a :class:`~blockpilot.runtime.plan_types.RobotObservation` checked and turned into the
robot chat prompt, torch-free. The :class:`~blockpilot.runtime.planner.Planner` calls it for a robot observation;
decoding (scaffold, ``ar``, rollouts) and parsing are the same as for driving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..vla.config import ModelConfig
from ..vla.plans import ActionChunkSchema, RobotActionSchema
from ..vla.prompt import PromptInputError, robot_prompt_ids
from ..vla.slots import FixedNumber
from ..vla.tokenizer import Tokenizer
from .backend import Prompt
from .plan_types import ObservationError, RobotObservation, check_images

MAX_STATE_DIMS = 64


def check_robot_observation(observation: RobotObservation, config: ModelConfig,
                            schema: Any) -> tuple[list[npt.NDArray[np.uint8]], npt.NDArray[np.float64], FixedNumber]:
    """The observation's images, its state as a float array, and the number width the prompt writes it in;
    raises :class:`ObservationError` naming the offending part (or the planner's non-robot schema)."""
    if not isinstance(schema, (ActionChunkSchema, RobotActionSchema)):
        raise ObservationError(f"this planner answers in a {type(schema).__name__} layout, not a robot one: build it "
                               "with an action-chunk schema (e.g. --schema so101-joints or ee-delta)")
    if not isinstance(observation.instruction, str) or not observation.instruction.strip():
        raise ObservationError("observation.instruction is empty: give the task the robot should do")
    try:
        state = np.array(observation.state, dtype=np.float64)
    except (TypeError, ValueError):
        raise ObservationError(f"observation.state must be a list of numbers, got {observation.state!r}") from None
    if state.ndim != 1 or not 1 <= state.size <= MAX_STATE_DIMS:
        raise ObservationError(f"observation.state must be a flat list of 1..{MAX_STATE_DIMS} joint positions, "
                               f"got shape {state.shape}")
    check_state(schema, state, observation.gripper)
    return check_images(observation.images, config), state, FixedNumber(schema.int_digits, schema.frac_digits)


def check_state(schema: Any, state: npt.NDArray[np.float64], gripper: float | None) -> None:
    """Raise :class:`ObservationError` unless ``state`` (and ``gripper``) are finite and as many values as the
    schema's ``state_dims`` name (any number when it names none)."""
    if not np.isfinite(state).all() or (gripper is not None and not np.isfinite(gripper)):
        raise ObservationError("observation.state holds a non-finite value (state or gripper)")
    wanted = schema.state_dims if isinstance(schema, ActionChunkSchema) else ()
    got = state.size + (gripper is not None)
    if wanted and got != len(wanted):
        raise ObservationError(f"observation.state has {got} value(s) (gripper included); the schema's model reads "
                               f"{len(wanted)}: {', '.join(wanted)}")


def robot_prompt(observation: RobotObservation, config: ModelConfig, schema: Any, tokenizer: Tokenizer,
                 image_tokens: Callable[[Sequence[npt.NDArray[np.uint8]]], list[int]]) -> tuple[Prompt, int]:
    """The checked robot prompt and how many of its tokens are image tokens; ``image_tokens(images)`` gives each
    image's placeholder count (the planner's image policy)."""
    images, state, number = check_robot_observation(observation, config, schema)
    counts = image_tokens(images)
    try:
        ids = robot_prompt_ids(tokenizer, number, observation.instruction, state, counts, gripper=observation.gripper)
    except PromptInputError as exc:
        raise ObservationError(f"observation: {exc}") from None
    return Prompt(np.asarray(ids, dtype=np.int64), tuple(images)), sum(counts)
