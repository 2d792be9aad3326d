"""The one observation ``blockpilot bench`` times its plans on, chosen by the checkpoint's answer schema.

- A driving schema plans a held-out generated keyframe (one front camera), as it always has.
- An action-chunk schema (a robot model such as ``models/robot-so101``) plans the robot prompt: ``cameras`` frames
  (third-person first, then wrist) of the vision tower's window size, the state with one value per schema
  ``state_dims`` entry (six SO-101 joints when it names none), and the instruction of the task the checkpoint
  was trained on (``blockpilot.json``'s training task, else :data:`DEFAULT_INSTRUCTION`).

The frames are seeded noise rather than simulator renders, so the bench needs no simulator. A plan's cost depends
on the number of prompt and answer tokens and the forwards of its decoder; the frames' content only changes which
numbers the model writes into a fixed-width action chunk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import BenchError

DEFAULT_INSTRUCTION = "pick up the cube"


def _instruction(checkpoint: Path) -> str:
    """The instruction of the simulator task the checkpoint records it was trained on, else the default."""
    from ..sim.robot.so101 import TASKS

    try:
        training = json.loads((checkpoint / "blockpilot.json").read_text(encoding="utf-8")).get("training") or {}
        task = (training.get("train_stats") or {}).get("task") or training["recipe"]["rollout"]["task"]
        return TASKS[task].instruction
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return DEFAULT_INSTRUCTION


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


def bench_observation(checkpoint: Path, schema: Any, config: Any, cameras: int | None) -> tuple[Any, dict[str, Any]]:
    """The observation to plan on and what the report says of it (``kind``, ``cameras``, ``state_dims``,
    ``instruction``). ``cameras`` (``--cameras``) applies to an action-chunk schema only (default 1)."""
    from ..vla.plans import SO101_JOINTS, DrivingSchema

    check_plan_observation(checkpoint, schema, cameras)
    if isinstance(schema, DrivingSchema):
        from ..eval.synthetic import heldout_keyframes, observation

        return observation(heldout_keyframes(1, stride=8)[1]), {"kind": "driving", "cameras": 1}
    from ..runtime.plan_types import RobotObservation

    count = cameras or 1
    side = config.vision.window_size if config.vision is not None else 0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)] if side else []
    dims = list(schema.state_dims) or list(SO101_JOINTS)
    instruction = _instruction(checkpoint)
    robot = RobotObservation(images=images, instruction=instruction, state=np.zeros(len(dims)))
    return robot, {"kind": "action_chunk", "action": schema.action, "dims": list(schema.dims),
                         "steps": int(schema.steps), "cameras": len(images), "state_dims": dims,
                         "instruction": instruction}
