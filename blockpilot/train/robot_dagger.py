"""DAgger for the SO-101 model (Ross, Gordon and Bagnell, "A Reduction of Imitation Learning and Structured
Prediction to No-Regret Online Learning", AISTATS 2011): a trained policy drives, the expert labels.

Behaviour cloning on the expert's own states (and DART's noisy neighbours of them) leaves a model that has never
seen the states its own mistakes lead to; in closed loop the errors compound. A DAgger round rolls the trained
model out in the simulator on fresh training seeds, exactly as the closed loop runs it (its chunk rows executed,
clipped to the action space, until success, the environment's end or the step limit), and labels every visited
state with the scripted expert's clean action there. Those rollouts join the expert rollouts, and training goes on
from the model's weights (``train-robot --init DIR --dagger DIR``). The expert is stateless (its action is a
function of the gripper and block positions), so labelling a state the expert never visited is exact.

The policy is any :class:`~blockpilot.sim.robot.closed_loop.ChunkPolicy`; the CLI passes the planner of the
``--dagger`` checkpoint wrapped as the closed loop wraps it, so this module needs no runtime. The chunk label of a
visited state is the expert's actions at that state and the next ones the policy visited (as for DART rollouts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import BlockpilotError
from .robot_data import Rollout, RolloutConfig, RolloutFn, RolloutRecorder

DAGGER_MAX_STEPS = 40  # a stuck policy's rollout stops here: its later frames add little but repeats


class InitCheckpointError(BlockpilotError, ValueError):
    """An ``--init`` (or ``--dagger``) checkpoint that cannot seed this run; the message names it and why."""


def display_path(path: str | Path) -> str:
    """How a card names a checkpoint: as given when relative, else its directory name (no machine paths)."""
    p = Path(path)
    return p.as_posix() if not p.is_absolute() else p.name


def weights_digest(checkpoint: str | Path) -> str:
    """The sha256 of a checkpoint's ``model.safetensors`` (what a DAgger cache key and the card pin)."""
    path = Path(checkpoint) / "model.safetensors"
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise InitCheckpointError(f"{path}: cannot read the checkpoint's weights ({exc})") from None


@dataclass(frozen=True)
class DaggerData:
    """A DAgger round's rollouts: ``policy`` (a closed-loop chunk policy, the ``checkpoint``'s planner) drives on
    ``seeds``, running ``execute`` rows per plan, at most ``max_steps`` steps an episode."""

    policy: Any
    checkpoint: str
    seeds: tuple[int, ...]
    execute: int
    max_steps: int = DAGGER_MAX_STEPS

    @cached_property
    def digest(self) -> str:
        """The policy's weights' sha256, read once (the cache key and the train log both name it)."""
        return weights_digest(self.checkpoint)

    @property
    def source(self) -> str:
        """What made the rollouts, for the example cache's key: the policy's weights and how it ran."""
        return f"dagger:{self.digest}:execute={self.execute}:max_steps={self.max_steps}"

    def describe(self) -> dict[str, Any]:
        from .card import seed_spec

        return {"policy": display_path(self.checkpoint), "policy_sha256": self.digest,
                "seeds": seed_spec(list(self.seeds)), "execute": self.execute, "max_steps": self.max_steps}


def load_init(checkpoint: str | Path, tokenizer: Any, schema: Any) -> Any:
    """The float32 model of ``checkpoint`` to go on training, after checking it is one this run can continue: a
    VLA with the reference tokenizer, answering ``schema``. Raises :class:`InitCheckpointError` naming it."""
    from ..vla.loader import load_model
    from ..vla.schema_io import load_schema

    root = Path(checkpoint)
    try:
        saved = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
        stored_schema = load_schema(root)
        model = load_model(root, "float32", "cpu")
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        raise InitCheckpointError(f"--init {checkpoint}: not a checkpoint this run can load ({exc})") from None
    if saved != json.loads(tokenizer.backend.to_str()):
        raise InitCheckpointError(f"--init {checkpoint}: its tokenizer.json is not the reference tokenizer")
    if model.config.vision is None:
        raise InitCheckpointError(f"--init {checkpoint}: a text-only model; the robot model needs a vision tower")
    if stored_schema != schema:
        raise InitCheckpointError(f"--init {checkpoint}: it answers {stored_schema}, not this run's {schema}")
    return model


def init_record(checkpoint: str | Path) -> dict[str, Any]:
    """What the train log keeps of ``--init``: the checkpoint's name, its weights' digest and, when it has a train
    log, the command that reproduces it (so the card can give both stages)."""
    from .robot_card import reproduce_command

    record: dict[str, Any] = {"checkpoint": display_path(checkpoint), "sha256": weights_digest(checkpoint)}
    try:
        log = json.loads((Path(checkpoint) / "train_log.json").read_text(encoding="utf-8"))
        record["command"] = reproduce_command(log, display_path(checkpoint))
    except (OSError, ValueError, KeyError):
        pass  # trained elsewhere: the card names it by digest only
    return record


def policy_rollouts(policy: Any, max_steps: int = DAGGER_MAX_STEPS) -> RolloutFn:
    """A :data:`~.robot_data.RolloutFn` whose rollouts ``policy`` drives and the expert labels (at most
    ``max_steps`` steps each). ``train`` is ignored: a DAgger rollout is training data by construction."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")

    def rollouts(seeds: Sequence[int], config: RolloutConfig, train: bool) -> Iterable[Rollout]:
        from ..sim.robot.closed_loop import run_closed_loop_episode
        from ..sim.robot.so101 import ExpertConfig, SimSession

        expert_config = ExpertConfig(task=config.task, image_size=config.image_size, max_steps=max_steps)
        if not seeds:
            return
        sim = SimSession(expert_config, int(seeds[0]))
        try:
            for seed in seeds:
                recorder = RolloutRecorder()
                episode = run_closed_loop_episode(int(seed), policy, expert_config, sim=sim, on_step=recorder)
                if not recorder.rows["actions"]:  # the policy failed before its first step: nothing visited
                    continue
                yield recorder.rollout(int(seed), expert_config.spec.instruction, episode.success, noisy=False)
        finally:
            sim.close()

    return rollouts


__all__ = ["DAGGER_MAX_STEPS", "DaggerData", "InitCheckpointError", "display_path", "init_record", "load_init",
           "policy_rollouts", "weights_digest"]
