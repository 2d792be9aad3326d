"""The SO-101 training recipe: chunk labels and padding, DART rollouts, cached examples, and ``train-robot`` end to
end on two tiny stand-in episodes (a real simulator rollout is exercised by tests/test_robot_model.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.train.robot_data import (
    Rollout,
    RolloutConfig,
    action_chunks,
    build_robot_examples,
    noisy_episode,
)
from blockpilot.vla.config import BlockDiffusionConfig, LMConfig, ModelConfig, VisionConfig
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.plans import ActionChunkSchema
from blockpilot.vla.reference_model import reference_config
from blockpilot.vla.reference_tokenizer import build_reference_tokenizer
from blockpilot.vla.scaffold import build_scaffold
from blockpilot.vla.schema_io import load_schema

INSTRUCTION = "reach the cube and close the gripper on it"
CALLS: list[int] = []


def fake_rollouts(seeds: Sequence[int], config: RolloutConfig, train: bool) -> Iterable[Rollout]:
    """Two- or three-step stand-in episodes with random 56x56 frames (no simulator)."""
    CALLS.append(len(seeds))
    for seed in seeds:
        rng = np.random.default_rng(seed)
        steps = 2 + seed % 2
        actions = np.round(rng.uniform(-1, 1, (steps, 4)), 2).astype(np.float32)
        actions[-1] = 0.0
        yield Rollout(seed, INSTRUCTION, rng.integers(0, 256, (steps, 56, 56, 3), dtype=np.uint8),
                      rng.uniform(-1, 1, (steps, 6)).astype(np.float32), actions, True,
                      train and noisy_episode(seed, config), rng.uniform(0.1, 0.3, (steps, 3)).astype(np.float32),
                      rng.uniform(0.1, 0.3, (steps, 7)).astype(np.float32))


def tiny_config(vocab: int, tokens) -> ModelConfig:  # type: ignore[no-untyped-def]
    lm = LMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, max_position=2048, tie_word_embeddings=True, mrope_section=(2, 3, 3))
    vision = VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          window_size=56, fullatt_block_indexes=(0,))
    return ModelConfig(lm=lm, vision=vision, tokens=tokens, diffusion=BlockDiffusionConfig(32, 8),
                       architecture="qwen2_5_vl")


def test_chunks_repeat_the_last_action_past_the_end_and_flag_it() -> None:
    actions = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunks, pad = action_chunks(actions, 4)
    assert chunks.shape == (3, 4, 4)
    np.testing.assert_array_equal(chunks[1, :2], actions[1:])
    np.testing.assert_array_equal(chunks[1, 2:], [actions[-1]] * 2)
    assert pad.tolist() == [[False, False, False, True], [False, False, True, True], [False, True, True, True]]


def test_dart_draw_is_seeded_and_off_without_noise() -> None:
    config = RolloutConfig(dart_noise=0.2, dart_fraction=0.5)
    draws = [noisy_episode(s, config) for s in range(200)]
    assert draws == [noisy_episode(s, config) for s in range(200)]
    assert 60 < sum(draws) < 140
    assert not any(noisy_episode(s, RolloutConfig(dart_noise=0.0)) for s in range(50))
    with pytest.raises(ValueError, match="dart_fraction"):
        RolloutConfig(dart_fraction=1.5)


def test_examples_are_the_planner_prompt_and_the_chunk_and_are_cached(tmp_path: Path) -> None:
    tokenizer, tokens = build_reference_tokenizer()
    scaffold = build_scaffold(ActionChunkSchema.so101_ee(), tokenizer)
    vision = reference_config(tokenizer.vocab_size, tokens).vision
    assert vision is not None
    examples = build_robot_examples([4, 5], tokenizer, scaffold, vision, RolloutConfig(), cache_dir=tmp_path,
                                    rollouts=fake_rollouts, log=lambda _: None)
    assert len(examples) == 5 and examples.stats["episodes"] == 2
    decoded = scaffold.decode_plan(examples.answers[1][:-1]).actions
    np.testing.assert_allclose(decoded, examples.actions[1], atol=5e-3)  # two decimals in the answer
    assert examples.pad[1].tolist() == [False] + [True] * 7 and examples.answers[1][-1] == tokenizer.special.end
    assert "Task: " + INSTRUCTION in tokenizer.decode(examples.prompts[0].tolist())
    cached = list(tmp_path.glob("robot-examples-*.npz"))
    assert len(cached) == 1
    calls = len(CALLS)
    again = build_robot_examples([4, 5], tokenizer, scaffold, vision, RolloutConfig(), cache_dir=tmp_path,
                                 rollouts=fake_rollouts)
    assert len(CALLS) == calls  # read from the cache, nothing rolled out
    np.testing.assert_array_equal(again.answers, examples.answers)


def test_block_schema_prompts_carry_the_block_offset_and_are_cached_apart(tmp_path: Path) -> None:
    from blockpilot.vla.prompt import robot_instruction

    tokenizer, tokens = build_reference_tokenizer()
    vision = reference_config(tokenizer.vocab_size, tokens).vision
    assert vision is not None
    schemas = [ActionChunkSchema.so101_ee(), ActionChunkSchema.so101_ee_block()]
    sets = [build_robot_examples([4], tokenizer, build_scaffold(schema, tokenizer), vision, RolloutConfig(),
                                 cache_dir=tmp_path, rollouts=fake_rollouts, log=lambda _: None) for schema in schemas]
    assert len(list(tmp_path.glob("robot-examples-*.npz"))) == 2  # the schema is in the cache key
    np.testing.assert_array_equal(sets[0].answers, sets[1].answers)  # same labels, longer prompts
    episode = next(iter(fake_rollouts([4], RolloutConfig(), True)))
    assert episode.environment_state is not None and episode.ee_pose is not None
    offset = episode.environment_state[0] - episode.ee_pose[0, :3]
    text = robot_instruction(INSTRUCTION, [*episode.joints[0], *offset], schemas[1].number)
    assert text.split("Task: ")[1] in tokenizer.decode(sets[1].prompts[0].tolist())
    assert text.split("Task: ")[1] not in tokenizer.decode(sets[0].prompts[0].tolist())


def test_train_robot_writes_a_loadable_checkpoint_and_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import blockpilot.train.robot_data as robot_data
    import blockpilot.train.robot_trainer as robot_trainer

    monkeypatch.setattr(robot_trainer, "reference_config", tiny_config)
    monkeypatch.setattr(robot_data, "expert_rollouts", fake_rollouts)
    out = tmp_path / "robot"
    code = main(["train-robot", "--out", str(out), "--steps", "3", "--batch", "2", "--train-seeds", "0:2",
                 "--eval-seeds", "100:101", "--eval-every", "3", "--cache-dir", "", "--threads", "1"])
    assert code == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "blockpilot.json", "preprocessor_config.json",
                 "DATA_CARD.md", "train_log.json"):
        assert (out / name).is_file(), name
    assert load_schema(out) == ActionChunkSchema.so101_ee_block()  # the default --schema
    model = load_model(out)
    load_tokenizer(out, model.config)
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["history"]) == 3 and log["evals"][-1]["step"] == 3
    assert "l1" in log["metrics"]["final_eval"] and log["train_stats"]["examples"] == 5
    card = (out / "DATA_CARD.md").read_text()
    assert "blockpilot train-robot" in card and "--train-seeds 0:2" in card and "--schema so101-ee-block" in card
    assert "block_dx, block_dy, block_dz: the block's position minus the gripper point's" in card

    replay = tmp_path / "metrics.json"
    replay.write_text(json.dumps({"paired": {"samples": 7, "model_l1": 0.1, "baseline_l1": 0.2, "l1_reduction": 0.5,
                                             "model_gripper_accuracy": 1.0, "baseline_gripper_accuracy": 0.9},
                                  "counts": {"ok": 8, "parse_error": 0, "parse_rate": 1.0}, "latency_ms": {}}))
    assert main(["train-robot", "--out", str(out), "--record", f"replay={replay}"]) == 0
    assert json.loads((out / "train_log.json").read_text())["results"]["replay"]["model_l1"] == 0.1
    assert "reduction 50.0 %" in (out / "DATA_CARD.md").read_text()
    assert main(["train-robot", "--out", str(out), "--record", "replay"]) == 2

    other = tmp_path / "image-only"  # another model's train log, recorded as an ablation
    other.mkdir()
    (other / "train_log.json").write_text(json.dumps({"metrics": {}, "schema_preset": "so101-ee", "results": {
        "replay": {"model_l1": 0.29, "baseline_l1": 0.37, "l1_reduction": 0.222},
        "closed_loop": {"execute": 8, "policies": {"model": {"succeeded": 0, "episodes": 32, "success_rate": 0.0}}}}}))
    assert main(["train-robot", "--out", str(out), "--record", f"image_only={other / 'train_log.json'}"]) == 0
    assert ("ablation `image_only` (schema `so101-ee`, measured the same way): replay action L1 0.29 vs "
            "repeat-last-action 0.37 (reduction 22.2 %); closed-loop success 0/32 (0.0 %, 8 rows per plan)"
            in (out / "DATA_CARD.md").read_text())


def test_the_simulators_grasp_column_maps_onto_the_gripper_dim() -> None:
    from blockpilot.eval.robot_eval import map_dims

    info = {"features": {"action": {"shape": [4], "names": ["dx", "dy", "dz", "grasp"]}}}
    dims = ActionChunkSchema.so101_ee().dims
    assert map_dims(info, "action", dims, where="info.json").tolist() == [0, 1, 2, 3]
