"""``blockpilot plan``: one plan from a local checkpoint, a quantize output or a bundle, printed as JSON.

Three inputs: a driving observation (camera images for a VLA, none for a text-only model, the ego state and
the route command), a robot observation (``--instruction TEXT --state JSON``, third-person and wrist images,
answered as an action chunk in a schema such as ``so101-joints``), or a free instruction (``--prompt TEXT``)
answered in any schema (``--schema``: a preset or a JSON Schema file).
Exit 0 with a plan, 2 for bad input, 3 when the answer did not parse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_common import UserError, add_trusted_key_option, fraction, positive_float, positive_int
from .vla.prompt import EgoState

if TYPE_CHECKING:
    from .runtime.sources import RestoreQuantized

STATE_EXAMPLE = '[0.0, -1.2, 1.1, 0.4, 0.0, 0.3]'
EGO_EXAMPLE = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'


def add_arguments(plan: argparse.ArgumentParser) -> None:
    from .runtime.backend import BACKENDS
    from .runtime.plan_types import DECODERS
    from .vla.dtypes import add_dtype_option
    from .vla.schema_io import add_schema_option

    plan.add_argument("--checkpoint", required=True,
                      help="checkpoint dir (config.json, safetensors, tokenizer), what blockpilot quantize wrote "
                           "(its --out dir: plans as the checkpoint with the quantizers restored), or a bundle dir")
    plan.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                      help="auto: torch for a checkpoint or quantize output, onnxruntime for a bundle")
    plan.add_argument("--image", default=None, help="camera image file(s), comma-separated, in prompt order "
                                                   "(required for a model with a vision tower; refused without one)")
    plan.add_argument("--ego", default=None,
                      help=f"ego state as JSON or a JSON file: {EGO_EXAMPLE} (the 4 positions 2.0, 1.5, 1.0, 0.5 s "
                           "ago in the ego frame, x forward, y left, oldest first); required unless --prompt")
    plan.add_argument("--prompt", default=None,
                      help="plan from this instruction instead of a driving observation, answering in --schema "
                           "(any layout, e.g. a JSON Schema file)")
    plan.add_argument("--instruction", default=None,
                      help="plan a robot action chunk for this task (with --state; images: third-person, then wrist); "
                           "needs an action-chunk schema, e.g. --schema so101-joints")
    plan.add_argument("--state", default=None,
                      help=f"with --instruction: the joint positions as JSON or a JSON file, {STATE_EXAMPLE} or "
                           '{"joints": [...], "gripper": 0.3}')
    plan.add_argument("--system", default=None, help="with --prompt: the system message (default: a generic one)")
    add_schema_option(plan)
    plan.add_argument("--command", dest="route_command", default="go straight",
                      help="route command: turn left, go straight, turn right (default: go straight)")
    plan.add_argument("--decoder", default="scaffold", choices=list(DECODERS),
                      help="ar: scaffold-constrained greedy baseline; ar_free / block: free text; scaffold: "
                           "Fast-dDrive speculative; rollouts: N sampled trajectories (default: scaffold)")
    plan.add_argument("--rollouts", type=positive_int, default=4, help="trajectories for --decoder rollouts")
    plan.add_argument("--temperature", type=positive_float, default=0.5, help="sampling temperature for rollouts")
    plan.add_argument("--threshold", type=fraction, default=None,
                      help="confidence threshold (default: 0.9 for block, 0.0 for scaffold and rollouts)")
    plan.add_argument("--sub-block-cache", action="store_true", help="block decoder: reuse the block's KV")
    plan.add_argument("--sub-block-rule", default="published", choices=["published", "window"],
                      help="with --sub-block-cache: published (Fast-dLLM v2: whole block while the sub-block's first "
                           "token is masked, else the sub-block alone) or window (whole block once per sub-block, "
                           "else the sub-block plus one position); default: published")
    plan.add_argument("--softmax-dtype", default="float32", choices=["float32", "model"],
                      help="confidence arithmetic: float32, or the model's dtype as the published generate "
                           "(bf16 ties near 1.0 go to the first position); torch backend (default: float32)")
    plan.add_argument("--seed", type=int, default=0, help="rollout sampling seed")
    plan.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_dtype_option(plan)
    plan.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                      help="prompt budget the KV cache is sized for (default: from the image policy and cameras)")
    plan.add_argument("--json", action="store_true", help="print JSON on stdout (plan always does; accepted so "
                                                          "--json means the same on every command)")
    add_trusted_key_option(plan)


def read_ego(value: str) -> EgoState:
    """``--ego``: inline JSON (``{"past": [[x, y], ...], "speed": m/s, "accel": m/s2}``) or a file of it."""
    import numpy as np

    from .vla.prompt import PromptInputError, check_ego_history

    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--ego: {value!r} is neither inline JSON nor an existing file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--ego: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError("--ego: expected a JSON object with keys past, speed, accel")
    missing, unknown = {"past", "speed", "accel"} - set(data), set(data) - {"past", "speed", "accel"}
    if missing or unknown:
        raise UserError(f"--ego: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                        "expected past, speed, accel")
    try:
        ego = EgoState(np.asarray(data["past"], dtype=np.float64), float(data["speed"]), float(data["accel"]))
        check_ego_history(ego.past_waypoints)
        return ego
    except (PromptInputError, TypeError, ValueError) as exc:
        raise UserError(f"--ego: {exc}") from None


def read_state(value: str) -> tuple[Any, float | None]:
    """``--state``: a JSON list of joint positions, or ``{"joints": [...], "gripper": x}``, inline or in a file."""
    import numpy as np

    text = value
    if not value.lstrip().startswith(("[", "{")):
        if not Path(value).is_file():
            raise UserError(f"--state: {value!r} is neither inline JSON nor an existing file")
        text = Path(value).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--state: not valid JSON ({exc})") from None
    gripper = None
    if isinstance(data, dict):
        unknown = set(data) - {"joints", "gripper"}
        if "joints" not in data or unknown:
            raise UserError(f"--state: expected keys joints (and gripper), got {sorted(data)}")
        data, gripper = data["joints"], data.get("gripper")
    try:
        state = np.asarray(data, dtype=np.float64)
        grip = None if gripper is None else float(gripper)
    except (TypeError, ValueError):
        raise UserError(f"--state: expected a list of numbers, e.g. {STATE_EXAMPLE}") from None
    if state.ndim != 1 or state.size == 0 or not np.isfinite(state).all() or (grip is not None
                                                                              and not np.isfinite(grip)):
        raise UserError(f"--state: expected a non-empty flat list of finite numbers, e.g. {STATE_EXAMPLE}")
    return state, grip


def read_images(value: str) -> list[Any]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images: list[Any] = []
    for name in value.split(","):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--image: no such file {name!r}")
        try:
            with Image.open(path) as im:
                images.append(np.array(im.convert("RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"--image: cannot read {name!r} as an image ({exc})") from None
    return images


def run(args: argparse.Namespace, *, restore_quantized: RestoreQuantized | None = None) -> int:
    from .runtime.plan_types import DecoderSettings, Observation, PromptTooLongError
    from .runtime.sources import detect_source, open_planner
    from .vla.hf_config import load_config
    from .vla.plans import DrivingSchema
    from .vla.prompt import GENERIC_SYSTEM_PROMPT
    from .vla.schema_io import resolve_schema

    if (args.state is None) != (args.instruction is None):
        raise UserError("--state goes with --instruction" if args.instruction is None else
                        f"--instruction needs --state, the robot's joint positions (e.g. --state '{STATE_EXAMPLE}')")
    given = [flag for flag, value in (("--ego", args.ego), ("--instruction", args.instruction),
                                      ("--prompt", args.prompt)) if value is not None]
    if not given:
        raise UserError(f"give --ego (a driving observation, e.g. --ego '{EGO_EXAMPLE}'), --instruction TEXT with "
                        "--state (a robot observation) or --prompt TEXT")
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} are alternatives: a driving observation (--ego), a robot observation "
                        "(--instruction) or a free instruction (--prompt)")
    if args.system is not None and args.prompt is None:
        raise UserError("--system goes with --prompt")
    source = detect_source(args.checkpoint, flag="--checkpoint")  # a checkpoint, a quantize output or a bundle
    ego = read_ego(args.ego) if args.ego is not None else None
    state = read_state(args.state) if args.state is not None else None
    images = read_images(args.image) if args.image else []
    schema = resolve_schema(source.checkpoint or source.path, args.schema) if args.schema else None
    if ego is not None and schema is not None and not isinstance(schema, DrivingSchema):
        raise UserError(f"--schema {args.schema}: --ego plans the driving prompt and needs a driving schema, "
                        f"got {type(schema).__name__}; use --instruction (a robot observation) or --prompt TEXT "
                        "for other layouts")

    def check_vision(has_vision: bool) -> None:
        if not has_vision and images:
            raise UserError(f"--image: {args.checkpoint} is a text-only model (no vision_config in config.json); "
                            "leave --image out")
        if has_vision and not images:
            raise UserError(f"--image is required: {args.checkpoint} has a vision tower (vision_config in "
                            "config.json) and plans from camera images")

    if source.checkpoint is not None:  # refuse before the weights load
        check_vision(load_config(source.checkpoint).vision is not None)
    settings = DecoderSettings(name=args.decoder, threshold=args.threshold, rollouts=args.rollouts,
                               temperature=args.temperature, seed=args.seed,
                               sub_block_cache=args.sub_block_cache, sub_block_rule=args.sub_block_rule,
                               softmax_dtype=args.softmax_dtype)
    planner = open_planner(source, backend=args.backend, decoder=settings, device=args.device,
                           dtype=args.dtype, max_prompt_tokens=args.max_prompt_tokens, schema=schema,
                           cameras=len(images), restore_quantized=restore_quantized, flag="--checkpoint",
                           trusted_keys=args.trusted_keys)
    check_vision(planner.config.vision is not None)
    try:
        if ego is not None:
            plan = planner.plan(Observation(images, ego, args.route_command))
        elif state is not None:
            plan = planner.plan(robot_observation(planner.schema, args, images, *state))
        else:
            plan = planner.plan_text(args.prompt, images, system=args.system or GENERIC_SYSTEM_PROMPT)
    except PromptTooLongError as exc:  # name the flag that sized the cache, when the user gave it
        if args.max_prompt_tokens is None:
            raise
        raise UserError(f"--max-prompt-tokens {args.max_prompt_tokens}: {exc}") from None
    print(json.dumps(plan.to_dict(), indent=2))
    if plan.plan is None:
        # Exit 3: the model answered, the JSON above holds its text, but no plan came out of it.
        print(f"blockpilot plan: the answer did not parse: {plan.error}", file=sys.stderr)
        return 3
    return 0


def robot_observation(schema: Any, args: argparse.Namespace, images: list[Any], joints: Any,
                      gripper: float | None) -> Any:
    """The ``--instruction`` / ``--state`` observation, its state checked against ``schema`` (the flag named)."""
    from .runtime.plan_types import ObservationError, RobotObservation
    from .runtime.robot_plan import check_state
    from .vla.plans import ActionChunkSchema, RobotActionSchema

    if not isinstance(schema, (ActionChunkSchema, RobotActionSchema)):
        where = f"--schema {args.schema}" if args.schema else f"{args.checkpoint}'s schema"
        raise UserError(f"{where}: --instruction plans a robot action chunk and needs an action-chunk schema "
                        f"(--schema so101-joints or ee-delta), got {type(schema).__name__}")
    try:
        check_state(schema, joints, gripper)
    except ObservationError as exc:
        raise UserError(f"--state: {exc}") from None
    return RobotObservation(images, args.instruction, joints, gripper)
