"""load_model / save_checkpoint round trips through the HF layout, on the reference model."""

from __future__ import annotations

import json

import pytest
import torch

from blockpilot.vla.checkpoint import CheckpointError
from blockpilot.vla.hf_config import load_config
from blockpilot.vla.loader import load_model, load_tokenizer, save_checkpoint
from blockpilot.vla.reference_model import build_reference_model, write_reference_checkpoint
from blockpilot.vla.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("ref") / "checkpoint", seed=3)


def _prompt(model, n_text: int = 5):
    tokens = model.config.tokens
    ids = [tokens.vision_start, *[tokens.image] * 16, tokens.vision_end, *range(10, 10 + n_text)]
    return torch.tensor([ids])


def test_reference_checkpoint_round_trip_is_exact(reference_dir) -> None:
    original, _ = build_reference_model(seed=3)
    loaded = load_model(reference_dir)
    assert loaded.config == original.config
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # to_empty() on the meta-built model must not untie the LM head from the embeddings.
    assert loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight
    assert {p.name for p in reference_dir.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                         "preprocessor_config.json"}


def test_loaded_reference_model_runs_with_an_image(reference_dir) -> None:
    model = load_model(reference_dir)
    torch.manual_seed(0)
    patches = torch.randn(64, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 8, 8]])
    with torch.inference_mode():
        logits = model.logits(model(_prompt(model), pixel_values=patches, grid_thw=grid))
    assert logits.shape == (1, 23, model.config.lm.vocab_size)
    assert torch.isfinite(logits).all()


def test_bfloat16_load_keeps_rope_in_float32(reference_dir) -> None:
    fp32 = load_model(reference_dir)
    bf16 = load_model(reference_dir, dtype="bfloat16")
    assert bf16.lm.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.tensor([list(range(20, 60))])
    with torch.inference_mode():
        a = fp32.logits(fp32(ids))
        b = bf16.logits(bf16(ids)).float()
    # bf16 weights move logits a little; rounded RoPE frequencies would scramble positions.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_text_only_checkpoint_loads_into_vla_model(tmp_path, qwen2_checkpoint) -> None:
    ckpt, hf = qwen2_checkpoint()
    model = load_model(ckpt)
    assert model.visual is None
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.inference_mode():
        torch.testing.assert_close(model.logits(model(ids)), hf(ids).logits, atol=1e-4, rtol=0)
    save_checkpoint(model, tmp_path / "again")
    again = load_model(tmp_path / "again")
    with torch.inference_mode():
        assert torch.equal(again.logits(again(ids)), model.logits(model(ids)))


def test_tokenizer_ids_checked_against_config(reference_dir, tmp_path) -> None:
    model = load_model(reference_dir)
    tok = load_tokenizer(reference_dir, model.config)
    assert tok.special == model.config.tokens
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in reference_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    # A model vocabulary larger than the tokenizer's, with the mask id past the tokenizer's end.
    cfg["text_config"]["vocab_size"] = tok.vocab_size + 100
    cfg["mask_token_id"] = tok.vocab_size + 50
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="mask"):
        load_tokenizer(broken, load_config(broken))


def test_bad_dtype_and_missing_dir(tmp_path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="int8")
    with pytest.raises((CheckpointError, ValueError), match=r"config\.json"):
        load_model(tmp_path / "nowhere")
