"""Prompt assembly: chat-formatted token ids with image placeholders and the ego state as text.

The layout follows the Qwen2.5-VL chat format that Fast-dVLM / Fast-dDrive fine-tune on:
``<|im_start|>system ... <|im_end|>``, a user turn holding
``<|vision_start|><|image_pad|>*n<|vision_end|>`` per camera followed by the instruction, then
the opened assistant turn the answer continues.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import BlockpilotError
from .plans import DrivingSchema
from .slots import FixedNumber
from .tokenizer import Tokenizer

IM_START = "<|im_start|>"
ROUTE_COMMANDS = ("turn left", "go straight", "turn right")
DRIVING_SYSTEM_PROMPT = "You are the planner of an autonomous car. Answer in the JSON layout you were trained on."
ROBOT_SYSTEM_PROMPT = "You are the planner of a robot arm. Answer in the JSON layout you were trained on."
# An instruction given as text (blockpilot plan --prompt), answered in the planner's schema.
GENERIC_SYSTEM_PROMPT = "You are a helpful assistant. Answer in the JSON layout you were trained on."
# The driving prompt's ego history, as the model is trained on it (sim, nuScenes, WOD-E2E and MCAP replays):
# the positions 2.0, 1.5, 1.0 and 0.5 s before now (2 s at 2 Hz), oldest first. No padding rule: a
# shorter history is refused (a model never saw repeated points and would read them as standing still).
DRIVING_PAST_TIMES_S = (-2.0, -1.5, -1.0, -0.5)
# How the robot prompt names its cameras, in prompt order (a third camera and more: "camera 3", ...).
ROBOT_CAMERA_NAMES = ("third-person", "wrist")


class PromptInputError(BlockpilotError, ValueError):
    """An input of prompt assembly (ego state, route command, tokenizer, image token counts) is invalid; the message
    names the field. (A token prompt a backend refuses is :class:`blockpilot.runtime.backend.PromptError`.)"""


@dataclass(frozen=True, eq=False)
class EgoState:
    """What the car knows about itself: past positions in the current ego frame (x forward, y left,
    oldest first, metres), speed (m/s) and longitudinal acceleration (m/s²)."""

    past_waypoints: npt.NDArray[np.float64]
    speed_mps: float
    accel_mps2: float

    def __post_init__(self) -> None:
        past = np.array(self.past_waypoints, dtype=np.float64)  # a private, read-only copy
        if past.ndim != 2 or past.shape[1] != 2:
            raise PromptInputError(f"EgoState.past_waypoints must have shape (K, 2), got {past.shape}")
        if not (np.isfinite(past).all() and np.isfinite(self.speed_mps) and np.isfinite(self.accel_mps2)):
            raise PromptInputError("EgoState holds a non-finite value (past_waypoints, speed_mps or accel_mps2)")
        past.flags.writeable = False
        object.__setattr__(self, "past_waypoints", past)


def check_ego_history(past: npt.NDArray[np.float64]) -> None:
    """Raise :class:`PromptInputError` naming what is missing unless ``past`` holds exactly the prompt's history."""
    need, got = len(DRIVING_PAST_TIMES_S), int(past.shape[0])
    if got == need:
        return
    times = ", ".join(f"{t:+.1f} s" for t in DRIVING_PAST_TIMES_S)
    if got < need:
        missing = ", ".join(f"{t:+.1f} s" for t in DRIVING_PAST_TIMES_S[:need - got])
        detail = f"got {got}: the oldest {need - got} ({missing}) are missing"
    else:
        detail = f"got {got}: resample the history to these {need} instants"
    raise PromptInputError(f"ego past_waypoints: the driving prompt needs {need} past positions at {times} "
                      f"(2 s at 2 Hz, oldest first, ego frame); {detail}")


def driving_instruction(ego: EgoState, route_command: str, number: FixedNumber | None = None) -> str:
    """The user-turn text for driving: ego state and route command, numbers in the answer's width."""
    if route_command not in ROUTE_COMMANDS:
        raise PromptInputError(f"route_command must be one of {ROUTE_COMMANDS}, got {route_command!r}")
    number = number or FixedNumber(2, 2)

    def fmt(value: float, what: str) -> str:
        clipped = float(np.clip(value, -number.max_abs, number.max_abs))
        return number.format_value(clipped, what)

    past = ",".join(f"[{fmt(x, 'past.x')},{fmt(y, 'past.y')}]" for x, y in ego.past_waypoints)
    return (f"Ego speed {fmt(ego.speed_mps, 'speed')} m/s, acceleration {fmt(ego.accel_mps2, 'accel')} m/s2. "
            f"Past trajectory [{past}]. Route command: {route_command}. "
            "Plan the future trajectory.")


def chat_prompt_ids(tokenizer: Tokenizer, system: str, user_text: str, image_token_counts: Sequence[int]) -> list[int]:
    """Token ids of a one-turn chat prompt with ``image_token_counts[i]`` placeholders for image ``i``."""
    special = tokenizer.special
    im_start = tokenizer.token_to_id(IM_START)
    if im_start is None:
        raise PromptInputError(f"{tokenizer.source}: the tokenizer has no {IM_START} token for the chat format")
    if image_token_counts and None in (special.image, special.vision_start, special.vision_end):
        raise PromptInputError("images need tokens.image, tokens.vision_start and tokens.vision_end in the config")
    ids = [im_start, *tokenizer.encode(f"system\n{system}"), special.end, *tokenizer.encode("\n"),
           im_start, *tokenizer.encode("user\n")]
    for count in image_token_counts:
        if count <= 0:
            raise PromptInputError(f"an image needs a positive number of image tokens, got {count}")
        ids += [special.vision_start, *([special.image] * count), special.vision_end]  # type: ignore[list-item]
    ids += [*tokenizer.encode(user_text), special.end, *tokenizer.encode("\n"),
            im_start, *tokenizer.encode("assistant\n")]
    return ids


def driving_prompt_ids(tokenizer: Tokenizer, schema: DrivingSchema, ego: EgoState, route_command: str,
                       image_token_counts: Sequence[int]) -> list[int]:
    """The driving chat prompt: the system prompt, ``image_token_counts[i]`` placeholders per camera, and the ego
    state and route command written in ``schema``'s number format (the width the answer's numbers take).

    The one assembly of a driving prompt: the planner, the training examples and the demo all call it, so a
    model is planned with exactly the prompt it was trained on."""
    text = driving_instruction(ego, route_command, FixedNumber(schema.int_digits, schema.frac_digits))
    return chat_prompt_ids(tokenizer, DRIVING_SYSTEM_PROMPT, text, image_token_counts)


def robot_instruction(instruction: str, state: npt.ArrayLike, number: FixedNumber, *, cameras: int = 0,
                      gripper: float | None = None) -> str:
    """The user-turn text for manipulation: the cameras' names, the task, and the proprioceptive ``state`` (joint
    positions, then the optional ``gripper``) written in ``number``'s width, clipped to its range."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise PromptInputError("instruction is empty: give the task the robot should do")
    values = np.asarray(state, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise PromptInputError(f"state must be a non-empty list of joint positions, got shape {values.shape}")
    if not np.isfinite(values).all() or (gripper is not None and not np.isfinite(gripper)):
        raise PromptInputError("state holds a non-finite value")

    def fmt(value: float, what: str) -> str:
        return number.format_value(float(np.clip(value, -number.max_abs, number.max_abs)), what)

    names = [ROBOT_CAMERA_NAMES[i] if i < len(ROBOT_CAMERA_NAMES) else f"camera {i + 1}" for i in range(cameras)]
    views = f"Cameras: {', '.join(names)}. " if names else ""
    joints = ",".join(fmt(v, f"state[{i}]") for i, v in enumerate(values))
    grip = "" if gripper is None else f" Gripper {fmt(gripper, 'gripper')}."
    return f"{views}Task: {instruction.strip()} Robot state [{joints}].{grip} Plan the next actions."


def robot_prompt_ids(tokenizer: Tokenizer, number: FixedNumber, instruction: str, state: npt.ArrayLike,
                     image_token_counts: Sequence[int], *, gripper: float | None = None) -> list[int]:
    """The manipulation chat prompt: the robot system prompt, ``image_token_counts[i]`` placeholders per camera
    (third-person first, then wrist), the instruction and the state in the answer's number width ``number``.
    The one assembly of a robot prompt, as :func:`driving_prompt_ids` is for driving."""
    text = robot_instruction(instruction, state, number, cameras=len(image_token_counts), gripper=gripper)
    return chat_prompt_ids(tokenizer, ROBOT_SYSTEM_PROMPT, text, image_token_counts)
