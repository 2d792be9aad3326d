"""Reference-model training recipe: labels, block-diffusion packing and masks, loss weights, training runs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from blockpilot.geometry import to_ego_frame
from blockpilot.sim.types import Agent, Road, Scene, Track
from blockpilot.train.data import answer_sections, build_examples
from blockpilot.train.labels import LabelRules, derive_plan
from blockpilot.train.objective import (
    CLEAN,
    AnswerLayout,
    ObjectiveConfig,
    TrainBatch,
    bd_attention_mask,
    block_diffusion_loss,
    make_batch,
    maskable,
    pack_layout,
    pack_rows,
    sample_views,
    token_weights,
)
from blockpilot.train.trainer import evaluate, train_reference
from blockpilot.vla.config import BlockDiffusionConfig, LMConfig, ModelConfig, SpecialTokens, VisionConfig
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.plans import DrivingSchema
from blockpilot.vla.reference_model import init_weights, reference_schema
from blockpilot.vla.reference_tokenizer import build_reference_tokenizer
from blockpilot.vla.scaffold import build_scaffold
from blockpilot.vla.schema_io import SCHEMA_FILE, load_schema, save_schema
from blockpilot.vla.tokenizer import Tokenizer

DT = 0.1
SCHEMA = reference_schema()


# ---- a stand-in for the simulator: constant-acceleration, constant-yaw-rate ego, static agents ----

@dataclass(frozen=True)
class Keyframe:
    scene_name: str
    step: int
    time_s: float
    past_xy: np.ndarray
    speed: float
    accel: float
    route_command: str
    future_xy: np.ndarray
    future_xy_5s: np.ndarray
    future_valid: bool


def make_scene(speed: float = 10.0, accel: float = 0.0, yaw_rate: float = 0.0, agents: tuple[Agent, ...] = (),
               steps: int = 80, seed: int = 0, route: str = "go straight") -> Scene:
    states = np.zeros((steps, 5))
    x = y = yaw = 0.0
    v = speed
    for i in range(steps):
        states[i] = (x, y, yaw, v, accel if v > 0 else 0.0)
        x, y = x + v * np.cos(yaw) * DT, y + v * np.sin(yaw) * DT
        yaw += yaw_rate * DT
        v = max(v + accel * DT, 0.0)
    road = Road(centerline=np.array([[-50.0, 0.0], [400.0, 0.0]]), lane_width=3.5, speed_limit=15.0)
    return Scene(seed=seed, name=f"scene-{seed}", dt=DT, ego=Track(states), agents=agents, road=road,
                 route_command=route)


def static_agent(kind: str, xy: tuple[float, float], steps: int = 80, agent_id: int = 1) -> Agent:
    states = np.zeros((steps, 5))
    states[:, :2] = xy
    return Agent(agent_id, kind, (4.0, 1.8, 1.5) if kind == "vehicle" else (0.6, 0.6, 1.7), Track(states))


def keyframes(scene: Scene, rate_hz: float = 2.0) -> list[Keyframe]:
    every = round(1 / (rate_hz * DT))
    out = []
    for step in range(2 * every, scene.num_steps, every):
        origin, yaw = scene.ego.xy[step], float(scene.ego.yaw[step])
        future = [step + every * k for k in range(1, 7)]
        valid = future[-1] < scene.num_steps
        fut = to_ego_frame(scene.ego.xy[[min(f, scene.num_steps - 1) for f in future]], origin, yaw)
        past = to_ego_frame(scene.ego.xy[[step - 2 * every, step - every, step]], origin, yaw)
        out.append(Keyframe(scene.name, step, step * DT, past, float(scene.ego.speed[step]),
                            float(scene.ego.accel[step]), scene.route_command, fut, np.zeros((10, 2)), valid))
    return out


def scene_for_seed(seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    agents = (static_agent("pedestrian", (float(rng.uniform(20, 60)), 0.5)),) if seed % 2 else ()
    return make_scene(speed=float(rng.uniform(3, 12)), accel=float(rng.uniform(-2, 2)),
                      yaw_rate=float(rng.uniform(-0.3, 0.3)), agents=agents, steps=60, seed=seed)


def camera(scene: Scene, step: int) -> np.ndarray:
    rng = np.random.default_rng(scene.seed * 1000 + step)
    return rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)


SIM = (scene_for_seed, keyframes, camera)


# ---- labels ----

def _plan(scene: Scene, step: int = 20):
    kf = next(k for k in keyframes(scene) if k.step == step)
    return derive_plan(scene, kf, SCHEMA)


def test_labels_follow_the_egos_future() -> None:
    cruise = _plan(make_scene(speed=10.0))
    assert (cruise.longitudinal, cruise.lateral) == ("keep_speed", "straight")
    np.testing.assert_allclose(cruise.waypoints[:, 0], 5.0 * np.arange(1, 7), atol=1e-9)
    assert not any(cruise.critical_objects.values())
    assert cruise.explanation == "The road ahead is clear, so keep speed and keep the lane."
    assert _plan(make_scene(speed=5.0, accel=2.0)).longitudinal == "accelerate"
    assert _plan(make_scene(speed=12.0, accel=-2.0)).longitudinal == "decelerate"
    assert _plan(make_scene(speed=4.0, accel=-3.0)).longitudinal == "stop"
    assert _plan(make_scene(speed=8.0, yaw_rate=0.3)).lateral == "left_turn"
    assert _plan(make_scene(speed=8.0, yaw_rate=-0.3)).lateral == "right_turn"


def test_a_sideways_shift_off_the_lane_is_a_lane_change() -> None:
    scene = make_scene(speed=10.0)
    states = scene.ego.states.copy()
    states[20:50, 1] = np.linspace(0.0, 3.5, 30)  # 3.5 m to the left over 3 s, heading kept
    states[50:, 1] = 3.5
    shifted = Scene(seed=0, name="lane-change", dt=DT, ego=Track(states), agents=(), road=scene.road,
                    route_command="go straight")
    assert _plan(shifted).lateral == "left_lane_change"


def test_labels_of_real_sim_scenes_fit_the_scaffold() -> None:
    from blockpilot.sim.generator import generate_scene
    from blockpilot.sim.samples import keyframes as sim_keyframes

    tok, _ = _tokenizer()
    scaffold = build_scaffold(SCHEMA, tok)
    for seed in (0, 1):
        scene = generate_scene(seed)
        for kf in sim_keyframes(scene)[::6]:
            if not kf.future_valid:
                continue
            plan = derive_plan(scene, kf, SCHEMA)
            back = scaffold.decode_plan(scaffold.encode_plan(plan))
            assert back.explanation == plan.explanation  # fits the 16-token slot untruncated
            np.testing.assert_allclose(back.waypoints, kf.future_xy, atol=0.006)
            assert (back.longitudinal, back.lateral) == (plan.longitudinal, plan.lateral)


def test_critical_objects_are_road_users_near_the_path_ahead() -> None:
    # Ego at x = 20 m at step 20 (10 m/s): a pedestrian 15 m ahead in the lane, a vehicle far to the side,
    # a cyclist behind.
    agents = (static_agent("pedestrian", (35.0, 0.5), agent_id=1), static_agent("vehicle", (30.0, 12.0), agent_id=2),
              static_agent("cyclist", (10.0, 0.0), agent_id=3))
    plan = _plan(make_scene(speed=10.0, agents=agents))
    flags = plan.critical_objects
    assert flags["pedestrian"] and not flags["nearby_vehicle"] and not flags["cyclist"]
    assert sum(flags.values()) == 1
    assert plan.explanation.startswith("A pedestrian is ahead")
    beyond = make_scene(speed=1.0, agents=(static_agent("vehicle", (2.0 + LabelRules().look_ahead + 5.0, 0.0)),))
    assert not _plan(beyond).critical_objects["nearby_vehicle"]


def test_examples_skip_invalid_futures_and_are_cached(tmp_path: Path) -> None:
    tok, _ = _tokenizer()
    scaffold = build_scaffold(SCHEMA, tok)
    vision = _tiny_config().vision
    assert vision is not None
    ex = build_examples([1, 2], tok, scaffold, vision, cache_dir=tmp_path, sim=SIM)
    expected = sum(k.future_valid for s in (1, 2) for k in keyframes(scene_for_seed(s)))
    assert len(ex) == expected and ex.stats["skipped_keyframes"] > 0
    assert ex.answers.shape[1] == len(scaffold) + 1 and (ex.answers[:, -1] == tok.special.end).all()
    assert all((p == tok.special.image).sum() == 4 for p in ex.prompts)  # 56x56 -> 2x2 merged tokens
    again = build_examples([1, 2], tok, scaffold, vision, cache_dir=tmp_path, sim=SIM)
    assert len(list(tmp_path.glob("examples-*.npz"))) == 1
    np.testing.assert_array_equal(again.answers, ex.answers)
    assert all(np.array_equal(a, b) for a, b in zip(again.prompts, ex.prompts, strict=True))
    plan = scaffold.decode_plan(ex.answers[0, :-1])
    np.testing.assert_allclose(plan.waypoints, ex.waypoints[0], atol=0.006)


# ---- packing, masks, weights ----

def _reference_mask(slots: np.ndarray, segment: np.ndarray, block: int) -> np.ndarray:
    n = len(slots)
    out = np.zeros((n, n), dtype=bool)
    for q in range(n):
        for k in range(n):
            qb, kb = slots[q] // block, slots[k] // block
            if segment[q] == CLEAN:
                out[q, k] = segment[k] == CLEAN and kb <= qb  # clean: block-causal
            elif segment[k] == CLEAN:
                out[q, k] = kb < qb  # noisy block i sees clean blocks < i ...
            else:
                out[q, k] = segment[k] == segment[q] and kb == qb  # ... and its own noisy block only
    return out


@pytest.mark.parametrize(("prompt_len", "length", "block"), [(10, 32, 8), (16, 40, 8), (5, 12, 4)])
def test_packed_attention_mask_matches_loop_reference(prompt_len: int, length: int, block: int) -> None:
    slots, segment = pack_layout(prompt_len, length, block, views=2)
    start = prompt_len // block * block
    assert len(slots) == length + 2 * (length - start)
    mask = bd_attention_mask(torch.from_numpy(slots), torch.from_numpy(segment), block).numpy()
    np.testing.assert_array_equal(mask, _reference_mask(slots, segment, block))


def test_complementary_views_supervise_every_answer_token_once() -> None:
    gen = torch.Generator().manual_seed(3)
    for prompt_len, length in [(10, 48), (16, 48), (3, 24)]:
        first, second = sample_views(prompt_len, length, 8, ObjectiveConfig(), gen)
        can = maskable(prompt_len, length, 8)
        assert not (first & second).any() and ((first | second) == can).all()
        starts = (np.arange(length) >= prompt_len) & (np.arange(length) % 8 == 0)
        covered = first.astype(int) + second.astype(int) + starts.astype(int)
        np.testing.assert_array_equal(covered, (np.arange(length) >= prompt_len).astype(int))
        packed = pack_rows([prompt_len], [length], [[first, second]], 8)
        np.testing.assert_array_equal(np.sort(packed.targets.numpy()), np.arange(prompt_len, length))
        # Shifted prediction: from the same view's state one slot back, or the clean one at a block start.
        slots, segment = packed.slots[0].numpy(), packed.segment[0].numpy()
        at = packed.pred_at.numpy()
        np.testing.assert_array_equal(slots[at], packed.targets.numpy() - 1)
        np.testing.assert_array_equal(segment[at] == CLEAN, packed.targets.numpy() % 8 == 0)


def test_section_weights_scale_tokens() -> None:
    names = ("critical_objects", "trajectory", "end")
    layout = AnswerLayout(names, np.array([0, 0, 1, 1, 1, 2], dtype=np.int8),
                          np.array([True, False, True, False, False, True]))
    config = ObjectiveConfig(section_weights={"critical_objects": 1.0, "trajectory": 3.0, "end": 2.0},
                             null_weight=0.25, structure_weight=0.5)
    w = token_weights(np.array([9, 9, 9, 9, 4, 2]), layout, null_id=4, config=config)
    np.testing.assert_allclose(w, [0.5, 1.0, 1.5, 3.0, 0.75, 2.0])


@lru_cache(maxsize=1)
def _tokenizer() -> tuple[Tokenizer, SpecialTokens]:
    return build_reference_tokenizer()


def _tiny_config() -> ModelConfig:
    tok, tokens = _tokenizer()
    lm = LMConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, max_position=2048, tie_word_embeddings=True, mrope_section=(2, 3, 3))
    vision = VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          window_size=56, fullatt_block_indexes=(0,))
    return ModelConfig(lm=lm, vision=vision, tokens=tokens, diffusion=BlockDiffusionConfig(16, 8),
                       architecture="qwen2_5_vl")


def _tiny_batch(rows: int = 2) -> tuple[ModelConfig, TrainBatch]:
    tok, _ = _tokenizer()
    scaffold = build_scaffold(DrivingSchema(explanation_tokens=4), tok)
    config = _tiny_config()
    assert config.vision is not None
    ex = build_examples([1, 2], tok, scaffold, config.vision, sim=SIM)
    layout = AnswerLayout(*answer_sections(scaffold))
    idx = [0, len(ex) - 1][:rows]
    batch = make_batch([ex.images[i] for i in idx], [ex.prompts[i] for i in idx],
                       [ex.answers[i] for i in idx], layout, config, ObjectiveConfig())
    return config, batch


def test_noisy_copy_matches_a_direct_block_forward() -> None:
    """The packed noisy block gives the same hidden states as running that block alone after its clean prefix."""
    config, batch = _tiny_batch()
    torch.manual_seed(0)
    model = VLAModel(config).eval()
    init_weights(model, std=0.2)
    block = config.diffusion.block_size
    p, n = batch.prompt_lens[0], batch.lengths[0]
    patches = int(batch.grid_thw[0].prod())
    view = np.zeros(n, dtype=bool)
    k = (p // block + 2) * block  # a noisy block wholly inside the answer
    view[k + 1:k + block] = True
    with torch.no_grad():
        parts = block_diffusion_loss(model, batch, ObjectiveConfig(ar_weight=0.0), torch.Generator(),
                                     views=[[view], [np.zeros(batch.lengths[1], dtype=bool)]])
        ids = batch.ids[:1, :k + block].clone()
        ids[0, k + 1:k + block] = config.tokens.mask
        prefix = model(batch.ids[:1, :k], pixel_values=batch.pixel_values[:patches], grid_thw=batch.grid_thw[:1],
                       position_ids=batch.positions[:, :1, :k], mode=AttentionMode.BLOCK, block_size=block)
        embeds = model.embed(ids, model.encode_images(batch.pixel_values[:patches], batch.grid_thw[:1]))
        mask = torch.zeros(k + block, k + block, dtype=torch.bool)
        mask[:k, :k] = torch.tril(torch.ones(k // block, k // block, dtype=torch.bool)).repeat_interleave(
            block, 0).repeat_interleave(block, 1)
        mask[k:, :] = True
        direct = model(inputs_embeds=embeds, position_ids=batch.positions[:, :1, :k + block], attn_mask=mask)
    torch.testing.assert_close(direct[:, :k], prefix, atol=1e-5, rtol=1e-5)
    sel = (parts.rows == 0) & (parts.slots > k) & (parts.slots < k + block)
    expected = model.logits(direct[0, parts.slots[sel] - 1]).argmax(-1)
    assert sel.sum() == block - 1
    torch.testing.assert_close(parts.predicted[sel], expected)


def test_few_steps_reduce_the_loss_and_seeded_runs_repeat() -> None:
    config, batch = _tiny_batch(rows=1)

    def run(seed: int) -> list[float]:
        torch.manual_seed(seed)
        model = VLAModel(config)
        init_weights(model, seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(5):
            parts = block_diffusion_loss(model, batch, ObjectiveConfig(), gen)
            opt.zero_grad()
            parts.total.backward()
            opt.step()
            losses.append(parts.total.item())
        return losses

    first, again = run(0), run(0)
    assert first == again
    assert first[-1] < 0.8 * first[0]


# ---- the training command end to end ----

def test_train_reference_writes_a_loadable_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import blockpilot.train.trainer as trainer

    monkeypatch.setattr(trainer, "reference_config", lambda vocab, tokens: _tiny_config())
    out = tmp_path / "ckpt"
    metrics = train_reference(out, [1, 2], steps=3, batch=2, lr=1e-3, seed=0, device="cpu", eval_seeds=[9],
                              eval_every=3, keyframe_stride=1, sim=SIM, log=lambda _: None)
    for name in ("config.json", "model.safetensors", "tokenizer.json", SCHEMA_FILE, "DATA_CARD.md",
                 "train_log.json"):
        assert (out / name).is_file(), name
    assert metrics["train_examples"] > 0 and "acc_trajectory" in metrics["final_eval"]
    model = load_model(out)
    tokenizer = load_tokenizer(out, model.config)
    schema = load_schema(out)
    assert schema == SCHEMA
    scaffold = build_scaffold(schema, tokenizer)
    assert model.config.vision is not None
    held_out = build_examples([9], tokenizer, scaffold, model.config.vision, sim=SIM).subset(64)
    # The checkpoint holds the trained weights: its held-out loss is the one the run reported last.
    again = evaluate(model, held_out, scaffold, AnswerLayout(*answer_sections(scaffold)), ObjectiveConfig(),
                     torch.device("cpu"), batch=2)
    assert again["loss"] == pytest.approx(metrics["final_eval"]["loss"], rel=1e-5)
    label = derive_plan(scene_for_seed(9), keyframes(scene_for_seed(9))[0], schema)
    assert scaffold.decode_plan(scaffold.encode_plan(label)).lateral == label.lateral
    assert "blockpilot train-reference" in (out / "DATA_CARD.md").read_text()


def test_schema_file_round_trip_and_default(tmp_path: Path) -> None:
    assert load_schema(tmp_path) == DrivingSchema.nuscenes()
    save_schema(tmp_path, DrivingSchema.wod_e2e(), note="x")
    assert load_schema(tmp_path) == DrivingSchema.wod_e2e()


def test_explicit_attention_mask_overrides_the_mode(tiny_lm) -> None:
    lm = tiny_lm()
    ids = torch.randint(0, 60, (2, 12))
    block = torch.arange(12)[:, None] // 4 >= torch.arange(12)[None, :] // 4
    with torch.no_grad():
        by_mode = lm(ids, mode=AttentionMode.BLOCK, block_size=4)
        torch.testing.assert_close(lm(ids, attn_mask=block), by_mode)
        torch.testing.assert_close(lm(ids, attn_mask=block.expand(2, -1, -1)), by_mode)
    with pytest.raises(ValueError, match="boolean"):
        lm(ids, attn_mask=block.float())
    with pytest.raises(ValueError, match="shape"):
        lm(ids, attn_mask=block[:5])


def test_seed_arguments_round_trip() -> None:
    from blockpilot.train.card import seed_spec
    from blockpilot.train.trainer import parse_seeds

    assert parse_seeds("3:7") == [3, 4, 5, 6] and parse_seeds("4") == [0, 1, 2, 3] and parse_seeds("5,1") == [5, 1]
    for seeds in ([3, 4, 5, 6], [5, 1, 9]):
        assert parse_seeds(seed_spec(seeds)) == seeds
