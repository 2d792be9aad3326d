"""The ``Planner``: observation in, driving plan out, over any :class:`~blockpilot.runtime.backend.Backend`.

One plan: check the observation, assemble the chat prompt (image placeholders counted without
touching pixels), check that prompt plus answer fits the KV cache, run the configured decoder,
decode and parse the answer. The module is torch-free; :meth:`Planner.from_checkpoint` imports
the torch backend only when asked for it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import require_extra
from ..vla.answer_parser import PlanParseError, parse_plan
from ..vla.config import ConfigError, ModelConfig
from ..vla.image_policy import ImagePolicy, ImagePolicyError, load_image_policy, prompt_budget
from ..vla.plans import DrivingSchema, PlanSchema
from ..vla.prompt import (
    DRIVING_SYSTEM_PROMPT,
    GENERIC_SYSTEM_PROMPT,
    PromptInputError,
    chat_prompt_ids,
    driving_prompt_ids,
)
from ..vla.scaffold import Scaffold, build_scaffold
from ..vla.slot_constraints import SlotConstraints, build_constraints
from ..vla.tokenizer import Tokenizer
from .backend import CHECKPOINT_BACKENDS, Backend, Prompt, TokenArray
from .decoders import (
    ArOptions,
    BlockOptions,
    Decoded,
    SpeculativeOptions,
    ar_greedy,
    block_threshold,
    check_no_mask,
    scaffold_speculative,
    shared_prefix_rollouts,
)
from .plan_stats import PlanStats, rollout_spread
from .plan_types import (
    DecoderSettings,
    Observation,
    ObservationError,
    Plan,
    PlannerSetupError,
    PromptTooLongError,
    RobotObservation,
    VlaPlan,
    check_images,
    check_observation,
    plan_points,
    with_points,
)
from .robot_plan import robot_prompt

if TYPE_CHECKING:
    from ..vla.model import VLAModel

DEFAULT_MAX_PROMPT_TOKENS = 1024


def cache_capacity(max_prompt_tokens: int, answer_tokens: int, block_size: int) -> int:
    """KV slots one plan may need: the block decoder may write up to one block past the answer."""
    return max_prompt_tokens + answer_tokens + block_size


class Planner:
    """Plans with one backend and one decoder; reusable after any error it raises.

    ``max_prompt_tokens`` is the prompt budget the cache was sized for (see :func:`cache_capacity`);
    a longer prompt is refused before any forward with :class:`PromptTooLongError`. ``prompt_limit`` lowers it
    (a bundle's cache is fixed at export; asking more than it holds is a :class:`PlannerSetupError`). Images
    are counted and resized by the backend's ``image_policy`` (the processor defaults where it has none).
    """

    def __init__(self, backend: Backend, config: ModelConfig, tokenizer: Tokenizer, *,
                 decoder: DecoderSettings | None = None, schema: PlanSchema[Any] | None = None,
                 prompt_limit: int | None = None) -> None:
        self.backend = backend
        self.config = config
        self.tokenizer = tokenizer
        policy: ImagePolicy | None = getattr(backend, "image_policy", None)
        if policy is None and config.vision is not None:
            policy = ImagePolicy.for_vision(config.vision)
        self.image_policy = policy
        # Any answer layout: driving plans from observations (plan), every schema from an instruction (plan_text).
        self.schema: PlanSchema[Any] = schema or DrivingSchema.nuscenes()
        self.scaffold: Scaffold[Any] = build_scaffold(self.schema, tokenizer)
        chosen = decoder or DecoderSettings()
        self.settings = chosen.filled(config.diffusion, len(self.scaffold))
        # The last section (the trajectory) is the one rollouts sample: everything before it is shared.
        self.options = chosen.resolve(config.diffusion, len(self.scaffold), config.tokens,
                                      fork_section=self.scaffold.sections[-1].key)
        assert self.settings.max_new_tokens is not None and self.settings.block_size is not None
        self.answer_budget = self.settings.max_new_tokens + self.settings.block_size
        if backend.capacity <= self.answer_budget:
            raise PlannerSetupError(f"the backend's KV cache ({backend.capacity} slots) cannot hold even the answer "
                                    f"budget of {self.answer_budget} slots ({self.settings.name} decoder)")
        max_batch = getattr(backend, "max_batch", None)
        if self.settings.name == "rollouts" and max_batch is not None and max_batch < self.settings.rollouts:
            raise PlannerSetupError(f"{self.settings.rollouts} rollouts need a backend with max_batch >= "
                                    f"{self.settings.rollouts}, this one has {max_batch}")
        if getattr(backend, "softmax_dtype", "float32") != self.settings.softmax_dtype:
            raise PlannerSetupError(f"softmax_dtype {self.settings.softmax_dtype!r} needs a backend that computes "
                                    f"confidences that way (the torch backend built with it); this "
                                    f"{type(backend).__name__} uses {getattr(backend, 'softmax_dtype', 'float32')!r}")
        self._prompt_limit = prompt_limit
        if prompt_limit is not None and not 0 < prompt_limit <= backend.capacity - self.answer_budget:
            raise PlannerSetupError(f"max_prompt_tokens {prompt_limit}: the backend's KV cache ({backend.capacity} "
                                    f"slots, {self.answer_budget} of them the answer's) fits prompts of 1.."
                                    f"{backend.capacity - self.answer_budget} tokens; {self._capacity_fix}")
        # Typed slots: built once with the scaffold, applied where the backend can (see slot_constraints).
        self.constraints: SlotConstraints | None = None
        if getattr(backend, "constrains_tokens", False) and self.settings.uses_scaffold:
            self.constraints = build_constraints(self.scaffold, config.lm.vocab_size)
            limit = getattr(backend, "max_slot_classes", None)  # a TensorRT engine's allowed_table profile
            if limit is not None and self.constraints.num_classes > limit:
                raise PlannerSetupError(f"the schema's typed slots need {self.constraints.num_classes} allowed-token "
                                        f"classes; the {type(backend).__name__} engine takes up to {limit}")
        try:  # a tokenizer without the chat tokens fails here, not on the first observation
            chat_prompt_ids(tokenizer, DRIVING_SYSTEM_PROMPT, "", [1] if config.vision is not None else [])
        except PromptInputError as exc:
            raise PlannerSetupError(str(exc)) from exc

    @property
    def max_prompt_tokens(self) -> int:
        fits = self.backend.capacity - self.answer_budget
        return fits if self._prompt_limit is None else min(fits, self._prompt_limit)

    @property
    def _capacity_fix(self) -> str:
        """How to get a larger prompt budget on this backend (a bundle's graphs fix it at export)."""
        return getattr(self.backend, "capacity_fix", "build the planner with a larger max_prompt_tokens")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, *, decoder: DecoderSettings | None = None,
                        schema: PlanSchema[Any] | None = None, backend: str = "torch", device: str = "cpu",
                        dtype: str = "float32", max_prompt_tokens: int | None = None, cameras: int = 1,
                        image_hw: tuple[int, int] | None = None) -> Planner:
        """Load a local HF checkpoint (config, tokenizer, weights, image policy) onto ``backend``; the answer
        schema defaults to the checkpoint's ``blockpilot.json`` (nuScenes driving without one). The KV cache
        holds ``max_prompt_tokens``, by default :func:`~blockpilot.vla.image_policy.prompt_budget` of the
        checkpoint's image policy for ``cameras`` frames (of size ``image_hw`` when given). ``dtype`` is float32,
        bfloat16, float16 or ``auto`` (the dtype the weights are stored in). Raises :class:`PlannerSetupError`
        naming the file for an unusable checkpoint, or the dtype for one the device cannot run."""
        require_extra("torch", "torch", f"planning from the checkpoint {checkpoint_dir} (backend {backend})")
        import torch

        from ..vla.checkpoint import CheckpointError
        from ..vla.hf_config import load_config
        from ..vla.loader import load_model, load_tokenizer
        from ..vla.schema_io import load_schema

        if backend not in CHECKPOINT_BACKENDS:
            raise PlannerSetupError(f"backend {backend!r} is not available; choose from {CHECKPOINT_BACKENDS}")
        try:
            kind = torch.device(device).type
        except RuntimeError as exc:  # an unparseable device string
            raise PlannerSetupError(f"device {device!r}: {exc}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise PlannerSetupError(f"device {device!r} asked for, but this torch build sees no CUDA device")
        try:
            # Config and tokenizer first: a wrong special id fails before gigabytes of weights load.
            config = load_config(checkpoint_dir)
            tokenizer = load_tokenizer(checkpoint_dir, config)
            policy = None if config.vision is None else load_image_policy(checkpoint_dir, config.vision)
            if schema is None:
                schema = load_schema(checkpoint_dir)
            model = load_model(checkpoint_dir, dtype=dtype, device=device)
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:  # ValueError: dtype, policy
            raise PlannerSetupError(str(exc)) from exc
        return cls.from_model(model, tokenizer, decoder=decoder, schema=schema, max_prompt_tokens=max_prompt_tokens,
                              backend=backend, image_policy=policy, cameras=cameras, image_hw=image_hw)

    @classmethod
    def from_model(cls, model: VLAModel, tokenizer: Tokenizer, *, decoder: DecoderSettings | None = None,
                   schema: PlanSchema[Any] | None = None,
                   max_prompt_tokens: int | None = None, backend: str = "torch",
                   image_policy: ImagePolicy | None = None, cameras: int = 1,
                   image_hw: tuple[int, int] | None = None) -> Planner:
        """A planner on the torch backend (or ``backend="cuda"``) over an in-memory model, its cache sized for
        the decoder and ``max_prompt_tokens`` (default: the prompt budget of ``cameras`` frames under
        ``image_policy``, itself defaulting to the processor defaults)."""
        if backend not in CHECKPOINT_BACKENDS:
            raise PlannerSetupError(f"backend {backend!r} is not available; choose from {CHECKPOINT_BACKENDS}")
        if backend == "cuda":
            from .cuda_backend import CudaBackend as make_backend
        else:
            from .torch_backend import TorchBackend as make_backend  # type: ignore[assignment]

        vision = model.config.vision
        if image_policy is None and vision is not None:
            image_policy = ImagePolicy.for_vision(vision)
        if max_prompt_tokens is None:
            try:
                max_prompt_tokens = prompt_budget(image_policy, cameras, image_hw=image_hw)
            except (ImagePolicyError, ValueError) as exc:
                raise PlannerSetupError(f"prompt budget for {cameras} camera(s): {exc}") from exc
        settings = decoder or DecoderSettings()
        answer = len(build_scaffold(schema or DrivingSchema.nuscenes(), tokenizer))
        resolved = settings.filled(model.config.diffusion, answer)
        assert resolved.max_new_tokens is not None and resolved.block_size is not None
        capacity = cache_capacity(max_prompt_tokens, resolved.max_new_tokens, resolved.block_size)
        rows = settings.rollouts if settings.name == "rollouts" else 1
        if settings.softmax_dtype != "float32":  # the published arithmetic: offered by the torch backend
            if backend != "torch":
                raise PlannerSetupError(f"softmax_dtype {settings.softmax_dtype!r} is offered by the torch backend "
                                        f"only, not {backend!r}")
            from .torch_backend import TorchBackend

            made: Any = TorchBackend(model, capacity, max_batch=rows, softmax_dtype=settings.softmax_dtype)
        else:
            made = make_backend(model, capacity, max_batch=rows)
        made.image_policy = image_policy
        return cls(made, model.config, tokenizer, decoder=settings, schema=schema)

    def prompt(self, observation: Observation | RobotObservation) -> tuple[Prompt, int]:
        """The checked prompt of ``observation`` (driving or robot) and how many of its tokens are image tokens."""
        if isinstance(observation, RobotObservation):
            return robot_prompt(observation, self.config, self.schema, self.tokenizer, self._image_counts)
        if not isinstance(self.schema, DrivingSchema):
            raise ObservationError(f"this planner answers in a {type(self.schema).__name__} layout, not a driving "
                                   "one: plan a RobotObservation, or an instruction with plan_text()")
        images = check_observation(observation, self.config)
        counts = self._image_counts(images)
        ids = driving_prompt_ids(self.tokenizer, self.schema, observation.ego, observation.route_command, counts)
        return Prompt(np.asarray(ids, dtype=np.int64), tuple(images)), sum(counts)

    def _image_counts(self, images: Sequence[Any]) -> list[int]:
        policy = self.image_policy
        return [policy.tokens(im.shape[0], im.shape[1]) for im in images] if policy is not None else []

    def text_prompt(self, instruction: str, images: Sequence[Any] = (), *,
                    system: str = GENERIC_SYSTEM_PROMPT) -> tuple[Prompt, int]:
        """The checked chat prompt of a free ``instruction`` (plus camera ``images`` for a vision model)."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ObservationError("the instruction is empty: give the text the model should answer")
        checked = check_images(images, self.config)
        counts = self._image_counts(checked)
        ids = chat_prompt_ids(self.tokenizer, system, instruction, counts)
        return Prompt(np.asarray(ids, dtype=np.int64), tuple(checked)), sum(counts)

    def plan_text(self, instruction: str, images: Sequence[Any] = (), *,
                  system: str = GENERIC_SYSTEM_PROMPT) -> Plan:
        """Plan once from an instruction, answering in the planner's schema (any layout: a JSON Schema,
        the robot or the driving preset). Errors as :meth:`plan`."""
        t0 = time.perf_counter()
        prompt, image_tokens = self.text_prompt(instruction, images, system=system)
        return self.run(prompt, image_tokens, started=t0)

    def plan_robot(self, observation: RobotObservation) -> Plan:
        """Plan an action chunk from a :class:`RobotObservation` (as :meth:`plan`, which takes either kind)."""
        if not isinstance(observation, RobotObservation):
            raise ObservationError(f"plan_robot takes a RobotObservation, got {type(observation).__name__}")
        return self.plan(observation)

    def plan(self, observation: Observation | RobotObservation) -> Plan:
        """Plan once (a driving or a robot observation). Raises only :class:`~blockpilot.runtime.backend.BackendError`
        subclasses for bad input or a full cache; an answer that does not parse comes back as ``Plan.error``."""
        t0 = time.perf_counter()
        prompt, image_tokens = self.prompt(observation)
        return self.run(prompt, image_tokens, started=t0)

    def run(self, prompt: Prompt, image_tokens: int, *, started: float) -> Plan:
        """Decode and parse a checked prompt (``started``: when the plan began, for its total time)."""
        t0 = started
        if len(prompt) > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens ({image_tokens} of them for {len(prompt.images)} image(s)); "
                f"with the {self.settings.name} decoder's answer budget of {self.answer_budget} slots the KV cache "
                f"({self.backend.capacity} slots) fits at most {self.max_prompt_tokens}: {self._capacity_fix}, or "
                f"send fewer cameras")
        t1 = time.perf_counter()
        decoded = self.decode(self.backend, prompt)
        t2 = time.perf_counter()
        stage_ms = {"prompt": (t1 - t0) * 1e3, "vision": decoded.stage_ms.get("vision", 0.0),
                    "prefill": decoded.stage_ms.get("prefill", 0.0)}
        stage_ms["decode"] = (t2 - t1) * 1e3 - stage_ms["vision"] - stage_ms["prefill"]
        return self.finish(decoded, stage_ms, prompt_tokens=len(prompt), image_tokens=image_tokens, started=t0)

    def decode(self, backend: Backend, prompt: Prompt) -> Decoded:
        """Run the configured decoder on ``prompt`` (answer tokens and forward counts)."""
        check_no_mask(prompt, self.config.tokens.mask)  # MaskInPromptError (a PromptError) for every decoder
        options = self.options
        if isinstance(options, ArOptions):
            if not options.scaffold:  # ar_free
                return ar_greedy(backend, prompt, max_new_tokens=options.max_new_tokens, end_id=options.end_id)
            return ar_greedy(backend, prompt, max_new_tokens=options.max_new_tokens, end_id=options.end_id,
                             scaffold=self.scaffold, constraints=self.constraints)
        if isinstance(options, BlockOptions):
            return block_threshold(backend, prompt, options)
        if isinstance(options, SpeculativeOptions):
            return scaffold_speculative(backend, prompt, self.scaffold, options, self.constraints)
        return shared_prefix_rollouts(backend, prompt, self.scaffold, options, self.constraints)

    def finish(self, decoded: Decoded, stage_ms: dict[str, float], *, prompt_tokens: int = 0,
               image_tokens: int = 0, started: float | None = None) -> Plan:
        """Parse ``decoded``'s rows into a :class:`Plan` with its statistics (never raises on bad text)."""
        t0 = time.perf_counter()
        answers = [self.read_answer(row) for row in decoded.tokens]
        parsed = [a for a, _, _ in answers if a is not None]
        spread = None
        single = len(answers) == 1 and self.settings.name != "rollouts"
        if single:
            plan, error, text = answers[0]
        else:
            error = next((e for _, e, _ in answers if e is not None), None) if not parsed else None
            text = answers[0][2]
            plan = None
            points = [plan_points(p) for p in parsed]
            if parsed and all(p is not None for p in points):
                spread = rollout_spread([p for p in points if p is not None])
                # Rollouts share every section before the trajectory (or chunk); the plan carries their mean.
                plan = with_points(parsed[0], spread.mean)  # type: ignore[arg-type]
            elif parsed:  # a layout without waypoints has no mean to take: the first rollout that parsed
                plan = parsed[0]
        t1 = time.perf_counter()
        timings = {**stage_ms, "parse": (t1 - t0) * 1e3}
        timings["total"] = (t1 - started) * 1e3 if started is not None else sum(timings.values())
        stats = PlanStats(
            decoder=self.settings.name, settings=self.settings.to_dict(), forwards=decoded.forwards,
            row_forwards=decoded.row_forwards, prefill_forwards=decoded.prefill_forwards,
            decode_forwards=decoded.decode_forwards, tokens=int(decoded.tokens.shape[1]),
            rows=int(decoded.tokens.shape[0]), tokens_per_forward=decoded.tokens_per_forward,
            prompt_tokens=prompt_tokens, image_tokens=image_tokens, stop=decoded.stop, stage_ms=timings,
            constrained=self.constraints is not None)
        if single:
            return Plan(plan, error, text, stats, decoded.tokens)
        return Plan(plan, error, text, stats, decoded.tokens, spread, tuple(a for a, _, _ in answers),
                    tuple(t for _, _, t in answers), tuple(e for _, e, _ in answers))

    def read_answer(self, tokens: Sequence[int] | TokenArray) -> tuple[VlaPlan | None, PlanParseError | None, str]:
        """``(plan, None, text)`` or ``(None, error, text)`` for one row of answer tokens."""
        ids = np.asarray(tokens, dtype=np.int64)
        vocab = self.tokenizer.vocab_size
        outside = np.flatnonzero((ids < 0) | (ids >= vocab))
        # The model's embedding table may be larger than the tokenizer's vocabulary.
        text = self.tokenizer.decode(ids[(ids >= 0) & (ids < vocab)])
        null = self.scaffold.null_text
        clean = text.replace(null, "")
        if outside.size:
            pos = int(outside[0])
            offset = len(self.tokenizer.decode(ids[:pos]))
            return None, PlanParseError("answer", offset, f"token id {int(ids[pos])} at position {pos} is outside "
                                                          f"the tokenizer's vocabulary ({vocab})"), clean
        try:
            if self.settings.uses_scaffold and ids.shape == self.scaffold.token_ids.shape:
                return self.scaffold.decode_plan(ids), None, clean
            return parse_plan(text, self.schema, null_text=null), None, clean
        except PlanParseError as exc:
            return None, exc, clean

    def describe(self) -> dict[str, Any]:
        """Decoder settings and cache sizes, for logs."""
        return {"decoder": self.settings.to_dict(), "cache_slots": self.backend.capacity,
                "max_prompt_tokens": self.max_prompt_tokens, "answer_tokens": len(self.scaffold),
                "image_policy": None if self.image_policy is None else self.image_policy.to_dict(),
                "typed_slots": self.constraints is not None}
