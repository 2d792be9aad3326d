"""The reference model's tokenizer: a small byte-level BPE trained here, deterministically.

It pre-tokenizes like Qwen2 (each digit alone, letter runs with one leading non-letter,
punctuation runs, whitespace runs), so numbers in the answer layouts cost one token per
character just as with the real Qwen2 vocabulary. It is trained on answers rendered from the
driving and robot schemas plus a little driving vocabulary, all drawn from a fixed seed.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from .config import SpecialTokens
from .plans import DRIVING_PRESETS, DrivingPlan, DrivingSchema, RobotActionPlan, RobotActionSchema, render_plan
from .tokenizer import Tokenizer

# Special token texts of the reference vocabulary (Qwen2-style names); their ids are whatever
# training assigns and travel in the returned SpecialTokens, never as constants.
PAD_TEXT = "<|endoftext|>"
IM_START_TEXT = "<|im_start|>"
END_TEXT = "<|im_end|>"
MASK_TEXT = "<|mask|>"
NULL_TEXT = "<|null|>"
VISION_START_TEXT = "<|vision_start|>"
VISION_END_TEXT = "<|vision_end|>"
IMAGE_TEXT = "<|image_pad|>"
SPECIAL_TEXTS = (PAD_TEXT, IM_START_TEXT, END_TEXT, MASK_TEXT, NULL_TEXT, VISION_START_TEXT, VISION_END_TEXT,
                 IMAGE_TEXT)

_LETTERS = r"\p{L}+"
_NOT_LETTER_DIGIT_NEWLINE = r"[^\r\n\p{L}\p{N}]"
# Alternatives, first match wins: an English contraction suffix; a word with at most one leading
# non-letter; a single digit; a punctuation run with an optional leading space and trailing
# newlines; newline runs; whitespace not followed by a non-space; any other whitespace.
QWEN2_LIKE_SPLIT = "|".join((
    r"(?i:'(?:s|t|re|ve|m|ll|d))",
    f"{_NOT_LETTER_DIGIT_NEWLINE}?{_LETTERS}",
    r"\p{N}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
))

_AGENTS = ("a pedestrian", "a cyclist", "the lead vehicle", "a parked truck", "an ambulance", "a bus",
           "a motorcyclist", "construction cones", "a traffic light", "a stop sign", "a school bus", "a dog",
           "an oncoming car", "a delivery van", "a vehicle with an opening door")
_EVENTS = ("is crossing ahead", "is merging from the right", "turns red", "blocks the lane", "waits at the crosswalk",
           "brakes suddenly", "is stopped in our lane", "approaches the intersection", "turns green",
           "is pulling out of a driveway", "narrows the road")
_MANOEUVRES = ("slow down", "keep the current speed", "stop before the line", "change to the left lane",
               "change to the right lane", "turn left at the intersection", "turn right", "yield",
               "accelerate gently", "follow the lane", "nudge to the left")
_CONDITIONS = ("in light rain", "at night", "on a wet road", "in heavy traffic", "on a clear day", "near a school")
_OBJECTS = ("red cube", "blue cup", "drawer", "sponge", "bottle", "green block", "bowl", "towel")
_VERBS = ("pick up the", "place the", "open the", "close the", "push the", "grasp the", "lift the", "wipe with the")
_TARGETS = ("", " on the shelf", " into the bin", " next to the plate", " on the left side", " in the sink")
_PROMPTS = (
    "You are the driver of the ego vehicle. Plan the next few seconds.",
    "Front camera image. Ego speed 8.4 m/s, acceleration -0.3 m/s^2. Route command: go straight.",
    "Route command: turn left at the next intersection. Past trajectory in metres, x forward and y left.",
    "Answer with the critical objects, an explanation, the meta behaviour and the trajectory.",
    "Robot arm, wrist and scene cameras. Instruction: put the red cube in the bowl.",
)


def _explanation(rng: random.Random) -> str:
    agent, event, manoeuvre = rng.choice(_AGENTS), rng.choice(_EVENTS), rng.choice(_MANOEUVRES)
    if rng.random() < 0.5:
        return f"The ego vehicle should {manoeuvre} because {agent} {event} {rng.choice(_CONDITIONS)}."
    return f"{agent.capitalize()} {event}, so {manoeuvre} and keep a safe distance."


def _trajectory(rng: random.Random, num_points: int, rate_hz: float, limit: float) -> npt.NDArray[np.float64]:
    speed, yaw_rate = rng.uniform(0.0, 18.0), rng.uniform(-0.25, 0.25)
    t = np.arange(1, num_points + 1) / rate_hz
    heading = yaw_rate * t
    x = np.cumsum(speed * np.cos(heading)) / rate_hz
    y = np.cumsum(speed * np.sin(heading)) / rate_hz
    return np.clip(np.stack([x, y], axis=1), -limit, limit)


def _driving_answer(rng: random.Random, schema: DrivingSchema) -> str:
    limit = 10.0 ** schema.int_digits - 1
    plan = DrivingPlan(
        waypoints=_trajectory(rng, schema.num_waypoints, schema.rate_hz, limit),
        longitudinal=rng.choice(schema.longitudinal_options),
        lateral=rng.choice(schema.lateral_options),
        critical_objects={k: rng.random() < 0.2 for k in schema.critical_object_keys},
        explanation=_explanation(rng),
    )
    return render_plan(schema, plan)


def _robot_answer(rng: random.Random, schema: RobotActionSchema) -> str:
    limit = 10.0 ** schema.int_digits - 1
    points = np.array([[rng.uniform(-limit, limit) for _ in range(3)] for _ in range(schema.num_waypoints)])
    subtask = f"{rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TARGETS)}"
    return render_plan(schema, RobotActionPlan(subtask=subtask, gripper=rng.choice(schema.gripper_options),
                                               waypoints=points))


def reference_corpus(seed: int = 0, answers_per_schema: int = 64) -> list[str]:
    """Training text: rendered answers of every preset and the robot schema, explanations, prompts."""
    rng = random.Random(seed)
    lines = [_driving_answer(rng, schema) for schema in DRIVING_PRESETS.values() for _ in range(answers_per_schema)]
    robot = RobotActionSchema()
    lines += [_robot_answer(rng, robot) for _ in range(answers_per_schema)]
    lines += [_explanation(rng) for _ in range(4 * answers_per_schema)]
    lines += list(_PROMPTS) * 4
    return lines


def build_reference_tokenizer(out_dir: str | Path | None = None, *, vocab_size: int = 768,
                              seed: int = 0) -> tuple[Tokenizer, SpecialTokens]:
    """Train the reference BPE (same ids on every run); save ``tokenizer.json`` into ``out_dir`` if given."""
    if vocab_size < 256 + len(SPECIAL_TEXTS):
        raise ValueError(f"vocab_size must hold the 256 byte tokens and {len(SPECIAL_TEXTS)} special tokens")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()  # as Qwen2
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_LIKE_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TEXTS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(reference_corpus(seed), trainer=trainer)

    def id_of(text: str) -> int:
        token_id = backend.token_to_id(text)
        assert token_id is not None, text  # added as a special token just above
        return int(token_id)

    special = SpecialTokens(
        mask=id_of(MASK_TEXT), null=id_of(NULL_TEXT), end=id_of(END_TEXT), pad=id_of(PAD_TEXT),
        image=id_of(IMAGE_TEXT), vision_start=id_of(VISION_START_TEXT), vision_end=id_of(VISION_END_TEXT),
    )
    tokenizer = Tokenizer(backend, special, source="reference tokenizer")
    if out_dir is not None:
        tokenizer.source = str(tokenizer.save(Path(out_dir)))
    return tokenizer, special
