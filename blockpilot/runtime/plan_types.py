"""What goes into and comes out of the :class:`~blockpilot.runtime.planner.Planner`, torch-free.

Every error the planner raises at plan time derives from :class:`~blockpilot.runtime.backend.BackendError`
(bad observation, prompt too long, cache full), so a node catches that one type, logs it and
keeps serving; a malformed answer is not an error but a :class:`Plan` that carries its
:class:`~blockpilot.vla.answer_parser.PlanParseError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ..vla.answer_parser import PlanParseError
from ..vla.config import BlockDiffusionConfig, ModelConfig, SpecialTokens
from ..vla.image_grid import image_token_count
from ..vla.modes import AttentionMode
from ..vla.plans import ActionChunkPlan, DrivingPlan, RobotActionPlan
from ..vla.prompt import ROUTE_COMMANDS, EgoState, PromptInputError, check_ego_history
from .backend import BackendError, PromptError
from .decoders import SUB_BLOCK_RULES, ArOptions, BlockOptions, RolloutOptions, SpeculativeOptions
from .plan_stats import PlanStats, RolloutSpread

# "ar" is the scaffold-constrained greedy baseline that Fast-dDrive compares against (same
# answer as "scaffold", one token per forward); "ar_free" and "block" generate free text.
DECODERS = ("ar", "ar_free", "block", "scaffold", "rollouts")
SCAFFOLD_DECODERS = ("ar", "scaffold", "rollouts")
COMMIT_MODES = ("bidirectional", "causal")
# "model": the published bf16 confidence arithmetic, torch backend only (see runtime.confidence)
SOFTMAX_DTYPES = ("float32", "model")
DEFAULT_THRESHOLDS = {"block": 0.9, "scaffold": 0.0, "rollouts": 0.0}

# What DecoderSettings.resolve gives each decoder: the options its function takes.
DecoderOptions = ArOptions | BlockOptions | SpeculativeOptions | RolloutOptions

# A schema compiled from a JSON Schema document (blockpilot.vla.json_schema) answers with plain JSON values.
VlaPlan = DrivingPlan | RobotActionPlan | ActionChunkPlan | dict[str, Any]


class ObservationError(BackendError, ValueError):
    """An observation cannot be planned on (bad image, non-finite ego state, unknown command)."""


class PromptTooLongError(PromptError):
    """The prompt plus the answer budget does not fit the planner's KV cache."""


class PlannerSetupError(BackendError, ValueError):
    """The planner cannot be built as asked (checkpoint, backend or decoder settings)."""


@dataclass(frozen=True, slots=True)
class DecoderSettings:
    """Which decoder the planner runs, and its knobs. ``None`` means "from the model config"
    (block sizes) or "the decoder's default" (threshold: 0.9 block, 0.0 scaffold and rollouts;
    max_new_tokens: the scaffold's length, enough for any answer of the schema)."""

    name: str = "scaffold"
    block_size: int | None = None
    sub_block_size: int | None = None
    threshold: float | None = None
    max_new_tokens: int | None = None
    commit_mode: str = "bidirectional"
    sub_block_cache: bool = False
    sub_block_rule: str = "published"
    softmax_dtype: str = "float32"
    rollouts: int = 4
    temperature: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise PlannerSetupError(f"DecoderSettings: {msg}")

        need(self.name in DECODERS, f"name must be one of {DECODERS}, got {self.name!r}")
        for key in ("block_size", "sub_block_size", "max_new_tokens"):
            value = getattr(self, key)
            need(value is None or value >= 1, f"{key} must be positive, got {value}")
        if self.block_size is not None and self.sub_block_size is not None:
            need(self.block_size % self.sub_block_size == 0,
                 f"sub_block_size ({self.sub_block_size}) must divide block_size ({self.block_size})")
        need(self.threshold is None or 0.0 <= self.threshold <= 1.0,
             f"threshold must lie in [0, 1], got {self.threshold}")
        need(self.commit_mode in COMMIT_MODES, f"commit_mode must be one of {COMMIT_MODES}, got {self.commit_mode!r}")
        need(self.sub_block_rule in SUB_BLOCK_RULES,
             f"sub_block_rule must be one of {SUB_BLOCK_RULES}, got {self.sub_block_rule!r}")
        need(self.softmax_dtype in SOFTMAX_DTYPES,
             f"softmax_dtype must be one of {SOFTMAX_DTYPES}, got {self.softmax_dtype!r}")
        need(self.rollouts >= 1, f"rollouts must be at least 1, got {self.rollouts}")
        need(self.temperature > 0, f"temperature must be positive, got {self.temperature}")

    @property
    def uses_scaffold(self) -> bool:
        return self.name in SCAFFOLD_DECODERS

    def filled(self, diffusion: BlockDiffusionConfig, answer_tokens: int) -> DecoderSettings:
        """These settings with every ``None`` filled from the model's diffusion config and the scaffold length
        (what a plan reports it ran with)."""
        block = self.block_size or diffusion.block_size
        sub = self.sub_block_size or (diffusion.sub_block_size if block % diffusion.sub_block_size == 0 else block)
        return replace(self, block_size=block, sub_block_size=sub,
                       threshold=self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS.get(self.name),
                       max_new_tokens=answer_tokens if self.uses_scaffold else self.max_new_tokens or answer_tokens)

    def resolve(self, diffusion: BlockDiffusionConfig, answer_tokens: int, tokens: SpecialTokens, *,
                fork_section: str = "trajectory") -> DecoderOptions:
        """The typed options of this decoder's function (:mod:`blockpilot.runtime.decoders`), every ``None``
        filled as :meth:`filled` does; ``fork_section``: the scaffold section rollouts sample from."""
        s = self.filled(diffusion, answer_tokens)
        assert s.block_size is not None and s.sub_block_size is not None and s.max_new_tokens is not None
        if s.name in ("ar", "ar_free"):
            return ArOptions(end_id=tokens.end, max_new_tokens=s.max_new_tokens, scaffold=s.name == "ar")
        threshold = s.threshold if s.threshold is not None else 0.0
        if s.name == "block":
            return BlockOptions(mask_id=tokens.mask, end_id=tokens.end, block_size=s.block_size,
                                sub_block_size=s.sub_block_size, threshold=threshold, max_new_tokens=s.max_new_tokens,
                                commit_mode=AttentionMode(s.commit_mode), sub_block_cache=s.sub_block_cache,
                                sub_block_rule=s.sub_block_rule)
        speculative = SpeculativeOptions(mask_id=tokens.mask, block_size=s.block_size, threshold=threshold)
        if s.name == "scaffold":
            return speculative
        return RolloutOptions(speculative, rollouts=s.rollouts, temperature=s.temperature, seed=s.seed,
                              fork_section=fork_section)

    def to_dict(self) -> dict[str, Any]:
        """The settings that matter for ``name`` (rollout knobs only for rollouts, and so on)."""
        keep = {"name", "block_size", "max_new_tokens"}
        if self.name == "block":
            keep |= {"sub_block_size", "threshold", "commit_mode", "sub_block_cache"}
            if self.sub_block_cache:
                keep |= {"sub_block_rule"}
        elif self.name in ("scaffold", "rollouts"):
            keep |= {"threshold"}
        if self.name == "rollouts":
            keep |= {"rollouts", "temperature", "seed"}
        if self.softmax_dtype != "float32":
            keep |= {"softmax_dtype"}
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True, eq=False)
class Observation:
    """One planning input: camera images (``HxWx3`` uint8 RGB, prompt order), the ego state and the
    route command; checked by the planner, which names the offending part."""

    images: Sequence[npt.NDArray[np.uint8]]
    ego: EgoState
    route_command: str


@dataclass(frozen=True, eq=False)
class RobotObservation:
    """One manipulation input: camera images (``HxWx3`` uint8 RGB; third-person first, then wrist), the language
    ``instruction`` and the proprioceptive ``state`` (joint positions, radians) with an optional separate
    ``gripper`` value; planned into an action chunk by a planner with an
    :class:`~blockpilot.vla.plans.ActionChunkSchema` (or the ``robot`` layout)."""

    images: Sequence[npt.NDArray[np.uint8]]
    instruction: str
    state: npt.ArrayLike
    gripper: float | None = None


def plan_points(plan: VlaPlan | None) -> npt.NDArray[np.float64] | None:
    """The numeric rows rollouts average: a driving or robot plan's waypoints, an action chunk's actions."""
    if isinstance(plan, (DrivingPlan, RobotActionPlan)):
        return plan.waypoints
    return plan.actions if isinstance(plan, ActionChunkPlan) else None


def with_points(plan: DrivingPlan | RobotActionPlan | ActionChunkPlan,
                points: npt.NDArray[np.float64]) -> DrivingPlan | RobotActionPlan | ActionChunkPlan:
    """``plan`` with its numeric rows (see :func:`plan_points`) replaced by ``points``."""
    if isinstance(plan, ActionChunkPlan):
        return replace(plan, actions=points)
    return replace(plan, waypoints=points)


def for_model(observation: Observation, config: ModelConfig) -> Observation:
    """``observation`` as a model sees a dataset replay: a text-only model (no vision tower) plans from the
    ego state and route command alone, so the replayed camera images are left out."""
    if config.vision is None and observation.images:
        return Observation([], observation.ego, observation.route_command)
    return observation


@dataclass(frozen=True, eq=False)
class Plan:
    """The planner's answer. ``plan`` is the parsed plan or ``None`` with ``error`` saying why;
    ``text`` is the answer without padding and ``tokens`` ``(rows, n)`` the answer tokens. With
    rollouts, ``plan`` carries the mean trajectory of the rollouts that parsed, ``spread`` their
    disagreement, ``text`` is the first rollout's, and the ``rollout_*`` tuples hold one entry per
    rollout."""

    plan: VlaPlan | None
    error: PlanParseError | None
    text: str
    stats: PlanStats
    tokens: npt.NDArray[np.int64]
    spread: RolloutSpread | None = None
    rollout_plans: tuple[VlaPlan | None, ...] = ()
    rollout_texts: tuple[str, ...] = ()
    rollout_errors: tuple[PlanParseError | None, ...] = ()

    @property
    def ok(self) -> bool:
        return self.plan is not None

    @property
    def waypoints(self) -> npt.NDArray[np.float64] | None:
        """``(K, 2)`` metres in the ego frame (x forward, y left) for driving; ``None`` if unparsed."""
        return self.plan.waypoints if isinstance(self.plan, (DrivingPlan, RobotActionPlan)) else None

    @property
    def behaviour(self) -> dict[str, str] | None:
        if isinstance(self.plan, DrivingPlan):
            return {"longitudinal": self.plan.longitudinal, "lateral": self.plan.lateral}
        if isinstance(self.plan, RobotActionPlan):
            return {"subtask": self.plan.subtask, "gripper": self.plan.gripper}
        return None

    @property
    def actions(self) -> npt.NDArray[np.float64] | None:
        """``(steps, dims)`` for an action chunk (the rollouts' mean with rollouts); ``None`` otherwise."""
        return self.plan.actions if isinstance(self.plan, ActionChunkPlan) else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: waypoints (or an action chunk), behaviour, text, parse error, rollouts and statistics."""
        out: dict[str, Any] = {
            "waypoints": None if self.waypoints is None else self.waypoints.tolist(),
            "behaviour": self.behaviour,
            "text": self.text,
            "parse_error": None if self.error is None else str(self.error),
        }
        if isinstance(self.plan, DrivingPlan):
            out["critical_objects"] = [k for k, v in self.plan.critical_objects.items() if v]
            out["explanation"] = self.plan.explanation
        if isinstance(self.plan, ActionChunkPlan):
            out["actions"] = self.plan.actions.tolist()
            out["action_dims"] = list(self.plan.dims)
        if isinstance(self.plan, dict):  # a JSON Schema layout: the parsed value itself
            out["value"] = self.plan
        if self.rollout_texts:
            out["rollouts"] = {
                "count": len(self.rollout_texts),
                "parsed": 0 if self.spread is None else self.spread.count,
                "waypoints": None if self.spread is None else self.spread.waypoints.tolist(),
                "std": None if self.spread is None else self.spread.std.tolist(),
                "max_deviation": None if self.spread is None else self.spread.max_deviation.tolist(),
                "parse_errors": [None if e is None else str(e) for e in self.rollout_errors],
            }
        out["stats"] = self.stats.to_dict()
        return out


def check_observation(observation: Observation, config: ModelConfig) -> list[npt.NDArray[np.uint8]]:
    """The observation's images, once every part is checked; raises :class:`ObservationError`."""
    ego = observation.ego
    if not isinstance(ego, EgoState):
        raise ObservationError(f"observation.ego must be an EgoState, got {type(ego).__name__}")
    # EgoState checks at construction, but its arrays stay writable (a node may refill one buffer).
    if not (np.isfinite(ego.past_waypoints).all() and np.isfinite(ego.speed_mps) and np.isfinite(ego.accel_mps2)):
        raise ObservationError("observation.ego holds a non-finite value (past_waypoints, speed_mps or accel_mps2)")
    try:
        check_ego_history(ego.past_waypoints)
    except PromptInputError as exc:
        raise ObservationError(f"observation.{exc}") from None
    if observation.route_command not in ROUTE_COMMANDS:
        raise ObservationError(f"unknown route command {observation.route_command!r}; expected one of {ROUTE_COMMANDS}")
    return check_images(observation.images, config)


def check_images(images: Sequence[npt.NDArray[np.uint8]], config: ModelConfig) -> list[npt.NDArray[np.uint8]]:
    """Camera images checked against the model (none for a text-only model, one or more for a VLA);
    raises :class:`ObservationError` naming the image."""
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        raise ObservationError(f"observation.images must be a list of HxWx3 uint8 arrays, got {type(images).__name__}")
    if config.vision is None:
        if images:
            raise ObservationError(f"the model has no vision tower but the observation has {len(images)} image(s)")
        return []
    if not images:
        raise ObservationError("the observation has no camera image; the model needs at least one")
    checked = []
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise ObservationError(f"image {i}: expected a numpy array, got {type(image).__name__}")
        if image.size == 0:
            raise ObservationError(f"image {i} is empty (shape {image.shape})")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ObservationError(f"image {i}: expected shape (H, W, 3) RGB, got {image.shape}")
        if image.dtype != np.uint8:
            raise ObservationError(f"image {i}: expected dtype uint8, got {image.dtype}")
        try:
            image_token_count(image.shape[0], image.shape[1], config.vision)
        except ValueError as exc:
            raise ObservationError(f"image {i}: {exc}") from None
        checked.append(image)
    return checked
