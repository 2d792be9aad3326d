"""The one observation ``blockpilot bench`` times its plans on, chosen by the checkpoint's answer schema.

- A driving schema plans a held-out generated keyframe (one front camera), as it always has.
- An action-chunk schema (a robot model such as ``models/robot-so101``) plans the robot prompt: ``cameras`` square
  frames (third-person first, then wrist) of the size the model was trained on (``blockpilot.json``'s training
  ``image_size``), else the largest square its image policy takes whole (what a bigger camera frame is resized
  to), the state with one value per schema ``state_dims`` entry (six SO-101 joints when it names none), and the
  instruction of the task it was trained on (its training task, else :data:`DEFAULT_INSTRUCTION`).

The frames are seeded noise rather than simulator renders, so the bench needs no simulator. A plan's cost depends
on the number of prompt and answer tokens and the forwards of its decoder; the frames' content only changes which
numbers the model writes into a fixed-width action chunk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import BenchError

DEFAULT_INSTRUCTION = "pick up the cube"


def _trained(checkpoint: Path, key: str) -> Any:
    """``key`` (``task``, ``image_size``) of the demonstrations the checkpoint records it was trained on, or None."""
    try:
        training = json.loads((checkpoint / "blockpilot.json").read_text(encoding="utf-8")).get("training") or {}
        return (training.get("train_stats") or {}).get(key) or training["recipe"]["rollout"][key]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _instruction(checkpoint: Path) -> str:
    """The instruction of the simulator task the checkpoint records it was trained on, else the default."""
    from ..sim.robot.so101 import TASKS

    task = _trained(checkpoint, "task")
    return TASKS[task].instruction if task in TASKS else DEFAULT_INSTRUCTION


def _frame_side(checkpoint: Path, policy: Any) -> int:
    """The side of the square frames: the trained ``image_size``, else the largest whole-merged-patch square
    within the policy's ``max_pixels``; 0 for a text-only model (``policy`` None)."""
    if policy is None:
        return 0
    trained = _trained(checkpoint, "image_size")
    if isinstance(trained, int) and trained >= policy.factor:
        return trained
    return max(policy.factor, math.isqrt(policy.max_pixels) // policy.factor * policy.factor)


def check_plan_observation(checkpoint: Path, schema: Any, cameras: int | None) -> None:
    """Refuse, before anything is measured, a schema bench cannot plan or ``--cameras`` with a driving one."""
    from ..vla.plans import ActionChunkSchema, DrivingSchema

    if isinstance(schema, DrivingSchema):
        if cameras is not None:
            raise BenchError(f"--cameras {cameras}: applies to a robot checkpoint (an action-chunk schema); "
                             f"{checkpoint} plans driving, on one front camera")
    elif not isinstance(schema, ActionChunkSchema):
        raise BenchError(f"--checkpoint {checkpoint}: bench plans a driving or an action-chunk schema, this one is "
                         f"{type(schema).__name__}; time its plans with blockpilot plan instead")


def bench_observation(checkpoint: Path, schema: Any, policy: Any, cameras: int | None) -> tuple[Any, dict[str, Any]]:
    """The observation to plan on and what the report says of it (``kind``, ``cameras``, ``image_hw``,
    ``state_dims``, ``instruction``); ``policy``: the planner's image policy (None: text only). ``cameras``
    (``--cameras``) applies to an action-chunk schema only (default 1)."""
    from ..vla.plans import SO101_JOINTS, DrivingSchema

    check_plan_observation(checkpoint, schema, cameras)
    if isinstance(schema, DrivingSchema):
        from ..eval.synthetic import heldout_keyframes, observation

        return observation(heldout_keyframes(1, stride=8)[1]), {"kind": "driving", "cameras": 1}
    from ..runtime.plan_types import RobotObservation

    count = cameras or 1
    side = _frame_side(checkpoint, policy)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)] if side else []
    dims = list(schema.state_dims) or list(SO101_JOINTS)
    instruction = _instruction(checkpoint)
    robot = RobotObservation(images=images, instruction=instruction, state=np.zeros(len(dims)))
    return robot, {"kind": "action_chunk", "action": schema.action, "dims": list(schema.dims),
                   "steps": int(schema.steps), "cameras": len(images), "image_hw": [side, side] if images else None,
                   "state_dims": dims, "instruction": instruction}
