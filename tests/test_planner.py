"""The Planner on the reference checkpoint: every decoder, exact statistics, typed errors, reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.demo import road_image
from blockpilot.runtime.backend import BackendError, CacheFullError, StepResult
from blockpilot.runtime.decoders import (
    ArOptions,
    BlockOptions,
    Decoded,
    RolloutOptions,
    SpeculativeOptions,
    ar_greedy,
    block_threshold,
    scaffold_speculative,
    shared_prefix_rollouts,
)
from blockpilot.runtime.plan_stats import rollout_spread
from blockpilot.runtime.plan_types import (
    DecoderSettings,
    Observation,
    ObservationError,
    PlannerSetupError,
    PromptTooLongError,
)
from blockpilot.runtime.planner import Planner, cache_capacity
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.answer_parser import PlanParseError
from blockpilot.vla.config import BlockDiffusionConfig
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.plans import DrivingPlan, render_plan
from blockpilot.vla.prompt import EgoState, PromptInputError

STAGES = {"prompt", "vision", "prefill", "decode", "parse", "total"}


def _obs(images: Any = None, command: str = "go straight", ego: EgoState | None = None) -> Observation:
    ego = ego or EgoState(np.array([[-7.5, 0.0], [-5.0, 0.0], [-2.5, 0.0], [0.0, 0.0]]), speed_mps=5.0, accel_mps2=0.0)
    return Observation([road_image(112)] if images is None else images, ego, command)


def _example(schema: Any, shift: float = 0.0) -> DrivingPlan:
    return DrivingPlan(waypoints=np.round([[2.5 * (i + 1) + shift, 0.1 * i - shift] for i in range(6)], 2),
                       longitudinal="keep_speed", lateral="straight",
                       critical_objects={k: k == "pedestrian" for k in schema.critical_object_keys},
                       explanation="A pedestrian waits at the crosswalk; keep the lane.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.vla.reference_model import write_reference_checkpoint

    return write_reference_checkpoint(tmp_path_factory.mktemp("planner") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def planners(checkpoint: Path) -> dict[str, Planner]:
    return {name: Planner.from_checkpoint(checkpoint, decoder=DecoderSettings(name=name))
            for name in ("ar", "ar_free", "block", "scaffold", "rollouts")}


@pytest.fixture(scope="module")
def plans(planners: dict[str, Planner]) -> dict[str, Any]:
    return {name: p.plan(_obs()) for name, p in planners.items()}


def _direct(name: str, planner: Planner) -> Decoded:
    """The decoder called by hand with ids and sizes from the model config, on the planner's backend."""
    config, scaffold = planner.config, planner.scaffold
    mask, end, block = config.tokens.mask, config.tokens.end, config.diffusion.block_size
    prompt, _ = planner.prompt(_obs())
    spec = SpeculativeOptions(mask_id=mask, block_size=block, threshold=0.0)
    backend = planner.backend
    if name == "ar":
        return ar_greedy(backend, prompt, max_new_tokens=len(scaffold), end_id=end, scaffold=scaffold,
                         constraints=planner.constraints)
    if name == "ar_free":
        return ar_greedy(backend, prompt, max_new_tokens=len(scaffold), end_id=end)
    if name == "block":
        return block_threshold(backend, prompt, BlockOptions(
            mask_id=mask, end_id=end, block_size=block, sub_block_size=config.diffusion.sub_block_size,
            threshold=0.9, max_new_tokens=len(scaffold), commit_mode=AttentionMode.BIDIRECTIONAL))
    if name == "scaffold":
        return scaffold_speculative(backend, prompt, scaffold, spec, planner.constraints)
    return shared_prefix_rollouts(backend, prompt, scaffold, RolloutOptions(spec, rollouts=4, temperature=0.5, seed=0),
                                  planner.constraints)


@pytest.mark.parametrize("name", ["ar", "ar_free", "block", "scaffold", "rollouts"])
def test_each_decoder_plans_with_the_decoders_exact_counts(name: str, planners: dict[str, Planner],
                                                           plans: dict[str, Any]) -> None:
    plan, planner = plans[name], planners[name]
    expected = _direct(name, planner)
    np.testing.assert_array_equal(plan.tokens, expected.tokens)
    s = plan.stats
    assert (s.forwards, s.row_forwards, s.prefill_forwards, s.decode_forwards, s.stop) == (
        expected.forwards, expected.row_forwards, expected.prefill_forwards, expected.decode_forwards, expected.stop)
    assert (s.rows, s.tokens) == expected.tokens.shape
    assert s.tokens_per_forward == pytest.approx(expected.tokens_per_forward)
    assert s.decoder == name and s.settings["name"] == name
    assert s.settings["block_size"] == planner.config.diffusion.block_size
    assert set(s.stage_ms) == STAGES and s.stage_ms["vision"] > 0 and min(s.stage_ms.values()) >= 0
    assert s.prompt_tokens == len(planner.prompt(_obs())[0]) and s.image_tokens == 16
    json.dumps(plan.to_dict())  # JSON-ready, whatever parsed


def test_resolve_gives_each_decoder_its_typed_options(planners: dict[str, Planner]) -> None:
    diffusion, tokens = BlockDiffusionConfig(block_size=16, sub_block_size=4), planners["block"].config.tokens
    ar = DecoderSettings(name="ar").resolve(diffusion, 100, tokens)
    free = DecoderSettings(name="ar_free", max_new_tokens=7).resolve(diffusion, 100, tokens)
    assert ar == ArOptions(end_id=tokens.end, max_new_tokens=100, scaffold=True)
    assert free == ArOptions(end_id=tokens.end, max_new_tokens=7, scaffold=False)
    block = DecoderSettings(name="block", commit_mode="causal", sub_block_cache=True).resolve(diffusion, 100, tokens)
    assert block == BlockOptions(mask_id=tokens.mask, end_id=tokens.end, block_size=16, sub_block_size=4,
                                 threshold=0.9, max_new_tokens=100, commit_mode=AttentionMode.CAUSAL,
                                 sub_block_cache=True)
    speculative = SpeculativeOptions(mask_id=tokens.mask, block_size=16, threshold=0.0)
    assert DecoderSettings(name="scaffold").resolve(diffusion, 100, tokens) == speculative
    rollouts = DecoderSettings(name="rollouts", rollouts=3, seed=5).resolve(diffusion, 100, tokens, fork_section="x")
    assert rollouts == RolloutOptions(speculative, rollouts=3, temperature=0.5, seed=5, fork_section="x")
    # The planner runs what resolve gives (its decode only dispatches on the type).
    assert {name: type(p.options).__name__ for name, p in planners.items()} == {
        "ar": "ArOptions", "ar_free": "ArOptions", "block": "BlockOptions", "scaffold": "SpeculativeOptions",
        "rollouts": "RolloutOptions"}
    fork = planners["rollouts"].options
    assert isinstance(fork, RolloutOptions) and fork.fork_section == planners["rollouts"].scaffold.sections[-1].key


def test_default_settings_come_from_the_model_config(planners: dict[str, Planner]) -> None:
    config = planners["block"].config
    block = planners["block"].settings
    assert (block.block_size, block.sub_block_size) == (config.diffusion.block_size, config.diffusion.sub_block_size)
    assert block.threshold == 0.9 and block.max_new_tokens == len(planners["block"].scaffold)
    assert planners["scaffold"].settings.threshold == 0.0
    assert (planners["rollouts"].settings.rollouts, planners["rollouts"].settings.temperature) == (4, 0.5)
    other = DecoderSettings(name="block").filled(BlockDiffusionConfig(block_size=16, sub_block_size=4), 100)
    assert (other.block_size, other.sub_block_size, other.max_new_tokens) == (16, 4, 100)
    assert set(DecoderSettings(name="ar").to_dict()) == {"name", "block_size", "max_new_tokens"}
    assert DecoderSettings(name="rollouts", rollouts=2).to_dict()["rollouts"] == 2


def test_scaffold_decoder_matches_constrained_ar(planners: dict[str, Planner], plans: dict[str, Any]) -> None:
    ar, fast = plans["ar"], plans["scaffold"]
    np.testing.assert_array_equal(ar.tokens, fast.tokens)
    assert ar.text == fast.text
    assert ar.stats.forwards == len(planners["ar"].scaffold)  # prefill + one step per answer token but the last
    assert str(ar.error) == str(fast.error)


@pytest.mark.parametrize("name", ["ar_free", "block"])
def test_random_weights_give_a_plan_with_a_parse_error_not_an_exception(name: str, plans: dict[str, Any]) -> None:
    plan = plans[name]
    assert plan.plan is None and plan.waypoints is None and not plan.ok
    assert isinstance(plan.error, PlanParseError)
    assert plan.to_dict()["parse_error"] == str(plan.error)


@pytest.mark.parametrize("name", ["ar", "scaffold"])
def test_random_weights_still_plan_under_typed_slots(name: str, plans: dict[str, Any]) -> None:
    plan = plans[name]  # the free decoders above lose this answer; typed value slots cannot
    assert plan.ok and plan.error is None and plan.stats.constrained


def test_rollouts_share_the_prefix_and_are_seeded(planners: dict[str, Planner], plans: dict[str, Any],
                                                  checkpoint: Path) -> None:
    plan, planner = plans["rollouts"], planners["rollouts"]
    fork = planner.scaffold.sections[-1].start
    assert plan.tokens.shape == (4, len(planner.scaffold))
    assert (plan.tokens[:, :fork] == plan.tokens[:1, :fork]).all()
    assert len(plan.rollout_texts) == len(plan.rollout_errors) == len(plan.rollout_plans) == 4
    assert plan.stats.row_forwards > plan.stats.forwards
    np.testing.assert_array_equal(planner.plan(_obs()).tokens, plan.tokens)
    other = Planner.from_checkpoint(checkpoint, decoder=DecoderSettings(name="rollouts", rollouts=4, seed=7))
    assert not np.array_equal(other.plan(_obs()).tokens[:, fork:], plan.tokens[:, fork:])


def test_encoded_plan_parses_through_the_planner(planners: dict[str, Planner]) -> None:
    planner = planners["scaffold"]
    example = _example(planner.schema)
    tokens = planner.scaffold.encode_plan(example)
    plan = planner.finish(Decoded(tokens[None], 10, 10, 1, "scaffold"), {"vision": 1.0})
    assert plan.ok and plan.error is None
    np.testing.assert_array_equal(plan.waypoints, example.waypoints)
    assert plan.behaviour == {"longitudinal": "keep_speed", "lateral": "straight"}
    assert plan.text == render_plan(planner.schema, example)
    assert plan.stats.tokens_per_forward == pytest.approx(len(tokens) / 9)
    assert set(plan.stats.stage_ms) == {"vision", "parse", "total"}
    assert plan.to_dict()["critical_objects"] == ["pedestrian"]
    # Free-text decoders parse the same answer without padding.
    free = planners["block"].read_answer(planner.tokenizer.encode(render_plan(planner.schema, example)))
    assert free[1] is None and isinstance(free[0], DrivingPlan)
    np.testing.assert_array_equal(free[0].waypoints, example.waypoints)


def test_out_of_vocabulary_answer_token_is_a_parse_error(planners: dict[str, Planner]) -> None:
    planner = planners["block"]
    ids = [*planner.tokenizer.encode('{"critical'), planner.tokenizer.vocab_size + 3]
    plan, error, text = planner.read_answer(ids)
    assert plan is None and isinstance(error, PlanParseError)
    assert "outside the tokenizer's vocabulary" in str(error) and text == '{"critical'


def test_rollout_mean_and_spread(planners: dict[str, Planner]) -> None:
    planner = planners["rollouts"]
    examples = [_example(planner.schema, shift) for shift in (0.0, 0.5, -1.0)]
    rows = [planner.scaffold.encode_plan(e) for e in examples]
    rows.append(planner.scaffold.token_ids.copy())  # all slots masked: cannot parse
    plan = planner.finish(Decoded(np.stack(rows), 20, 50, 1, "scaffold"), {})
    assert plan.ok and plan.error is None and plan.spread is not None
    stack = np.stack([e.waypoints for e in examples])
    mean = stack.mean(axis=0)
    dist = np.linalg.norm(stack - mean, axis=-1)
    np.testing.assert_allclose(plan.waypoints, mean)
    np.testing.assert_allclose(plan.spread.std, np.sqrt((dist**2).mean(axis=0)))
    np.testing.assert_allclose(plan.spread.max_deviation, dist.max(axis=0))
    assert plan.spread.count == 3 and plan.stats.rows == 4
    assert [e is None for e in plan.rollout_errors] == [True, True, True, False]
    assert [p is None for p in plan.rollout_plans] == [False, False, False, True]
    np.testing.assert_array_equal(plan.rollout_plans[1].waypoints, examples[1].waypoints)
    assert plan.to_dict()["rollouts"]["parsed"] == 3
    failed = planner.finish(Decoded(np.stack(rows[3:]), 20, 50, 1, "scaffold"), {})
    assert failed.plan is None and failed.spread is None and isinstance(failed.error, PlanParseError)
    single = rollout_spread([examples[0].waypoints])
    assert not single.std.any() and not single.max_deviation.any()


def _nan_ego() -> EgoState:
    ego = EgoState(np.array([[-7.5, 0.0], [-5.0, 0.0], [-2.5, 0.0], [0.0, 0.0]]), speed_mps=5.0, accel_mps2=0.0)
    # The waypoints are a read-only private copy, so only a forced write can corrupt the state;
    # the planner still checks before it plans.
    object.__setattr__(ego, "speed_mps", float("nan"))
    return ego


def test_ego_state_keeps_a_read_only_copy() -> None:
    buffer = np.array([[-2.5, 0.0], [0.0, 0.0]])
    ego = EgoState(buffer, speed_mps=5.0, accel_mps2=0.0)
    buffer[0, 1] = np.nan  # a reused message buffer refilled after construction
    assert np.isfinite(ego.past_waypoints).all()
    with pytest.raises(ValueError, match="read-only"):
        ego.past_waypoints[0, 1] = 1.0


@pytest.mark.parametrize(("observation", "error", "match"), [
    (lambda: _obs([road_image(112), np.zeros((0, 112, 3), np.uint8)]), ObservationError, "image 1 is empty"),
    (lambda: _obs([road_image(112).astype(np.float32)]), ObservationError, "image 0: expected dtype uint8"),
    (lambda: _obs([road_image(112), road_image(112)[..., 0]]), ObservationError, r"image 1: expected shape \(H, W"),
    (lambda: _obs([np.zeros((2, 600, 3), np.uint8)]), ObservationError, "image 0: image aspect ratio"),
    (lambda: _obs([]), ObservationError, "no camera image"),
    (lambda: _obs(ego=_nan_ego()), ObservationError, "non-finite"),
    (lambda: _obs(command="fly"), ObservationError, "unknown route command 'fly'"),
    (lambda: _obs([road_image(448)] * 60), PromptTooLongError, "max_prompt_tokens"),
])
def test_bad_input_raises_typed_error_and_the_planner_recovers(observation: Any, error: type[Exception], match: str,
                                                               planners: dict[str, Planner],
                                                               plans: dict[str, Any]) -> None:
    planner = planners["scaffold"]
    with pytest.raises(error, match=match) as info:
        planner.plan(observation())
    assert isinstance(info.value, BackendError)
    np.testing.assert_array_equal(planner.plan(_obs()).tokens, plans["scaffold"].tokens)


def test_nan_ego_state_is_refused_at_construction_too() -> None:
    with pytest.raises(PromptInputError, match="non-finite"):
        EgoState(np.zeros((2, 2)), float("nan"), 0.0)


class _FailingBackend:
    """Passes calls through to a torch backend, raising CacheFullError once on the chosen step."""

    def __init__(self, inner: TorchBackend, fail_at: Any) -> None:
        self.inner, self.fail_at, self.steps, self.failed = inner, fail_at, 0, False

    length = property(lambda self: self.inner.length)
    capacity = property(lambda self: self.inner.capacity)
    max_batch = property(lambda self: self.inner.max_batch)
    constrains_tokens = property(lambda self: self.inner.constrains_tokens)

    def prefill(self, prompt: Any, **kw: Any) -> StepResult:
        return self.inner.prefill(prompt, **kw)

    def step(self, tokens: Any, start: int, **kw: Any) -> StepResult:
        self.steps += 1
        if not self.failed and self.fail_at(self.steps, tokens):
            self.failed = True
            raise CacheFullError(f"KV cache write at slot {start} exceeds capacity {self.capacity}")
        return self.inner.step(tokens, start, **kw)

    def fork(self, n: int) -> None:
        self.inner.fork(n)

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)


@pytest.mark.parametrize(("name", "fail_at"), [
    ("scaffold", lambda step, tokens: step == 3),
    ("rollouts", lambda step, tokens: tokens.shape[0] > 1),  # after the fork, in batched rows
])
def test_cache_full_mid_plan_then_next_plan_succeeds(name: str, fail_at: Any, planners: dict[str, Planner],
                                                     plans: dict[str, Any]) -> None:
    good = planners[name]
    inner = TorchBackend(good.backend.model, good.backend.capacity, max_batch=4)  # type: ignore[attr-defined]
    planner = Planner(_FailingBackend(inner, fail_at), good.config, good.tokenizer,
                      decoder=DecoderSettings(name=name))
    with pytest.raises(CacheFullError):
        planner.plan(_obs())
    np.testing.assert_array_equal(planner.plan(_obs()).tokens, plans[name].tokens)


def test_checkpoint_with_mask_outside_the_vocabulary_fails_at_construction(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).symlink_to(f)
    config = json.loads((checkpoint / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**config, "mask_token_id": vocab + 10}))
    with pytest.raises(PlannerSetupError, match=r"config\.json.*mask") as info:
        Planner.from_checkpoint(bad)
    assert isinstance(info.value, BackendError)
    # An id inside the vocabulary that is an ordinary word, not the mask token, is caught by the tokenizer file.
    (bad / "config.json").write_text(json.dumps({**config, "mask_token_id": 100}))
    with pytest.raises(PlannerSetupError, match=r"tokenizer\.json.*'mask'"):
        Planner.from_checkpoint(bad)


def test_setup_errors(checkpoint: Path, planners: dict[str, Planner]) -> None:
    with pytest.raises(PlannerSetupError, match="backend 'tensorrt' is not available"):
        Planner.from_checkpoint(checkpoint, backend="tensorrt")
    with pytest.raises(PlannerSetupError, match=r"no config\.json"):
        Planner.from_checkpoint(checkpoint / "missing")
    with pytest.raises(PlannerSetupError, match="device 'gpu0'"):
        Planner.from_checkpoint(checkpoint, device="gpu0")
    with pytest.raises(PlannerSetupError, match="dtype must be one of"):
        Planner.from_checkpoint(checkpoint, dtype="int4")
    for kwargs in ({"name": "beam"}, {"threshold": 1.5}, {"rollouts": 0}, {"block_size": 32, "sub_block_size": 5},
                   {"temperature": 0.0}, {"commit_mode": "block"}):
        with pytest.raises(PlannerSetupError, match="DecoderSettings"):
            DecoderSettings(**kwargs)
    good = planners["scaffold"]
    model = good.backend.model  # type: ignore[attr-defined]
    with pytest.raises(PlannerSetupError, match="sub_block_size"):  # 5 does not divide the config's block of 32
        Planner(good.backend, good.config, good.tokenizer, decoder=DecoderSettings(sub_block_size=5))
    with pytest.raises(PlannerSetupError, match="cannot hold even the answer"):
        Planner(TorchBackend(model, 100), good.config, good.tokenizer)
    with pytest.raises(PlannerSetupError, match="max_batch >= 4"):
        Planner(TorchBackend(model, 1000), good.config, good.tokenizer, decoder=DecoderSettings(name="rollouts"))


def test_schema_comes_from_the_checkpoints_blockpilot_json(checkpoint: Path, tmp_path: Path) -> None:
    from blockpilot.vla.plans import DrivingSchema, RobotActionSchema
    from blockpilot.vla.schema_io import save_schema

    short = tmp_path / "short"
    short.mkdir()
    for f in checkpoint.iterdir():
        (short / f.name).symlink_to(f)
    save_schema(short, DrivingSchema(explanation_tokens=16))
    planner = Planner.from_checkpoint(short, decoder=DecoderSettings(name="ar"))
    assert planner.schema.explanation_tokens == 16
    assert planner.plan(_obs()).stats.tokens == len(planner.scaffold)
    # Another layout plans from an instruction (plan_text); a driving observation is refused, naming the layout.
    save_schema(short, RobotActionSchema())
    robot = Planner.from_checkpoint(short)
    assert isinstance(robot.schema, RobotActionSchema)
    with pytest.raises(ObservationError, match="RobotActionSchema"):
        robot.plan(_obs())
    plan = robot.plan_text("Put the red cube in the bowl.", [_obs().images[0]])
    assert plan.stats.tokens == len(robot.scaffold)


def test_cache_is_sized_from_prompt_answer_and_block(planners: dict[str, Planner]) -> None:
    planner = planners["block"]
    block = planner.config.diffusion.block_size
    assert planner.backend.capacity == cache_capacity(1024, len(planner.scaffold), block)
    assert planner.max_prompt_tokens == 1024
    assert planner.describe()["cache_slots"] == planner.backend.capacity


def test_planner_module_does_not_import_torch() -> None:
    code = "import sys, blockpilot.runtime.planner; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
