"""Checkpoint loading fails loudly, names what and where, and never half-loads a model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockpilot.vla.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    checkpoint_files,
    load_weights,
    save_weights,
)
from blockpilot.vla.config import ConfigError
from blockpilot.vla.hf_config import config_to_hf, load_config
from blockpilot.vla.lm import DecoderLM

MakeCheckpoint = Callable[..., tuple[Path, Any]]
MakeLM = Callable[..., DecoderLM]
VICTIM = "model.layers.1.mlp.up_proj.weight"


def fresh_model(path: Path) -> DecoderLM:
    torch.manual_seed(123)
    return DecoderLM(load_config(path).lm).eval()


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    file = path / SINGLE_FILE
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


@contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed by a failed load"


def expect_load_error(path: Path, *fragments: str) -> None:
    model = fresh_model(path)
    with untouched(model), pytest.raises(CheckpointError) as info:
        load_weights(model, path, "qwen2")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_missing_tensor(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    rewrite(path, lambda t: t.pop(VICTIM))
    expect_load_error(path, VICTIM, str(path), "missing")


def test_wrong_shape(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    file = rewrite(path, lambda t: t.__setitem__(VICTIM, torch.zeros(48, 31)))
    expect_load_error(path, VICTIM, str(file), "(48, 31)", "(48, 32)")


def test_integer_dtype(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    file = rewrite(path, lambda t: t.__setitem__(VICTIM, torch.zeros(48, 32, dtype=torch.int32)))
    expect_load_error(path, VICTIM, str(file), "int32")


def test_unexpected_tensor(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    expect_load_error(path, "model.layers.0.self_attn.extra.weight", SINGLE_FILE, "does not have")


def test_rotary_buffer_in_checkpoint_is_ignored(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4)))
    load_weights(fresh_model(path), path, "qwen2")


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header", "empty", "tiny"])
def test_unreadable_file(qwen2_checkpoint: MakeCheckpoint, damage: str) -> None:
    path, _ = qwen2_checkpoint()
    file = path / SINGLE_FILE
    data = file.read_bytes()
    broken = {
        "truncated": data[:-100],
        "corrupt_header": data[:8] + b"{oops" + data[13:],
        "empty": b"",
        "tiny": (1 << 40).to_bytes(8, "little") + b"{}",
    }[damage]
    file.write_bytes(broken)
    expect_load_error(path, str(file), "unreadable")


def test_missing_shard(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint(save_kwargs={"max_shard_size": "8KB"})
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    expect_load_error(path, str(shards[1]), INDEX_FILE, "missing")


def test_invalid_index(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint(save_kwargs={"max_shard_size": "8KB"})
    (path / INDEX_FILE).write_text("{not json")
    expect_load_error(path, str(path / INDEX_FILE))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    expect_load_error(path, str(path / INDEX_FILE), "weight_map")


def test_tensor_stored_twice(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    tensors = load_file(str(path / SINGLE_FILE))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[4:]}, str(path / "b.safetensors"))
    (path / SINGLE_FILE).unlink()
    weight_map = {n: "a.safetensors" for n in names[:5]} | {n: "b.safetensors" for n in names[5:]}
    (path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    expect_load_error(path, names[4], "a.safetensors", "b.safetensors")


def test_no_weights_at_all(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint_files(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_files(tmp_path / "nowhere")


def test_missing_or_invalid_config(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint()
    config = path / "config.json"
    text = config.read_text()
    config.unlink()
    with pytest.raises(ConfigError, match=r"no config\.json") as info:
        load_config(path)
    assert str(config) in str(info.value)
    config.write_text(text[:-20])
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        load_config(path)
    assert str(config) in str(info.value)
    config.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path)


def test_checkpoint_from_a_different_config_is_rejected(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, _ = qwen2_checkpoint(intermediate_size=40)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    # Whichever MLP tensor is read first is named; all three differ by the 40 vs 48 side.
    expect_load_error(path, "model.layers.0.mlp.", "40", "48", str(path / SINGLE_FILE))


def test_unknown_architecture(tiny_lm: MakeLM, tmp_path: Path) -> None:
    model = tiny_lm()
    with pytest.raises(CheckpointError, match="llama"):
        load_weights(model, tmp_path, "llama")
    with pytest.raises(CheckpointError, match="llama"):
        save_weights(model, tmp_path, "llama")


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tiny_lm: MakeLM, tmp_path: Path, tied: bool) -> None:
    model = tiny_lm(seed=5, tie_word_embeddings=tied)
    written = save_weights(model, tmp_path, "qwen2")
    assert written == tmp_path / SINGLE_FILE
    stored = load_file(str(written))
    assert "model.embed_tokens.weight" in stored and ("lm_head.weight" in stored) != tied
    copy = tiny_lm(seed=6, tie_word_embeddings=tied)
    load_weights(copy, tmp_path, "qwen2")
    for name, value in model.state_dict().items():
        assert torch.equal(value, copy.state_dict()[name]), name
    if tied:
        assert copy.lm_head.weight is copy.embed_tokens.weight


def test_save_replaces_a_sharded_checkpoint(qwen2_checkpoint: MakeCheckpoint, tiny_lm: MakeLM) -> None:
    path, _ = qwen2_checkpoint(save_kwargs={"max_shard_size": "8KB"})
    model = tiny_lm(seed=9, rope_theta=1e6)
    save_weights(model, path, "qwen2")
    assert not (path / INDEX_FILE).exists()
    loaded = tiny_lm(seed=1, rope_theta=1e6)
    load_weights(loaded, path, "qwen2")
    name = "layers.1.mlp.up_proj.weight"
    assert torch.equal(loaded.state_dict()[name], model.state_dict()[name])


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_loads_in_transformers(tiny_lm: MakeLM, tmp_path: Path, tied: bool) -> None:
    import transformers

    from blockpilot.vla.config import BlockDiffusionConfig, ModelConfig, SpecialTokens

    model = tiny_lm(seed=4, tie_word_embeddings=tied, head_dim=16)
    config = ModelConfig(lm=model.config, tokens=SpecialTokens(mask=60, null=61, end=62),
                         diffusion=BlockDiffusionConfig(4, 2))
    save_weights(model, tmp_path, "qwen2")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config)))
    assert load_config(tmp_path) == config
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), hf(ids, use_cache=False).logits, atol=1e-4, rtol=0)
