"""DecoderLM against transformers' Qwen2ForCausalLM on tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from blockpilot.vla.checkpoint import INDEX_FILE, SINGLE_FILE, load_weights
from blockpilot.vla.hf_config import load_config
from blockpilot.vla.lm import DecoderLM
from blockpilot.vla.modes import AttentionMode

ATOL = 1e-4
MakeCheckpoint = Callable[..., tuple[Path, Any]]


def load_ours(path: Path) -> DecoderLM:
    config = load_config(path)
    assert config.architecture == "qwen2"
    model = DecoderLM(config.lm).eval()
    load_weights(model, path, "qwen2")
    return model


def hf_logits(hf: Any, ids: torch.Tensor, mask: list[list[bool]] | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference logits; ``mask[q][k]`` True = query q may see key k (same for every row of the batch)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask, dtype=torch.bool)[None, None].expand(ids.shape[0], 1, -1, -1)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with torch.no_grad():
        return hf(ids, **kwargs).logits


def block_mask(slots: list[int], block_size: int) -> list[list[bool]]:
    return [[k // block_size <= q // block_size for k in slots] for q in slots]


def ids_for(batch: int, length: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True},
    "head_dim_16": {"head_dim": 16},  # hidden 32 / 4 heads would give 8
    "rope_theta": {"rope_parameters": {"rope_type": "default", "rope_theta": 37.0}},
    "three_layers": {"num_hidden_layers": 3, "rms_norm_eps": 1e-5},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_logits_match_transformers(qwen2_checkpoint: MakeCheckpoint, variant: str) -> None:
    path, hf = qwen2_checkpoint(**VARIANTS[variant])
    ours = load_ours(path)
    ids = ids_for(2, 13)
    with torch.no_grad():
        got = ours.logits(ours(ids))
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 1.0, "reference logits too small for the tolerance to mean anything"
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_sharded_checkpoint(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, hf = qwen2_checkpoint(save_kwargs={"max_shard_size": "8KB"})
    assert (path / INDEX_FILE).is_file() and len(list(path.glob("*.safetensors"))) > 2
    ours = load_ours(path)
    ids = ids_for(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_bf16_checkpoint_loads_into_fp32_model(qwen2_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    _, hf = qwen2_checkpoint()
    path = tmp_path / "bf16"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(path)
    with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    # The reference keeps fp32 everywhere (RoPE frequencies included) but with the bf16-rounded weights.
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ours = load_ours(path)
    assert ours.embed_tokens.weight.dtype == torch.float32
    ids = ids_for(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_inputs_embeds_and_explicit_positions(qwen2_checkpoint: MakeCheckpoint) -> None:
    path, hf = qwen2_checkpoint()
    ours = load_ours(path)
    ids = ids_for(2, 6)
    positions = torch.tensor([[3, 4, 5, 9, 10, 11], [0, 2, 4, 6, 8, 10]])
    with torch.no_grad():
        by_ids = ours(ids, position_ids=positions)
        by_embeds = ours(inputs_embeds=ours.embed_tokens(ids), position_ids=positions)
    assert torch.equal(by_ids, by_embeds)
    # An explicit causal mask: without one transformers reads position jumps as packed-sequence boundaries.
    ref = hf_logits(hf, ids, block_mask(list(range(6)), 1), position_ids=positions)
    torch.testing.assert_close(ours.logits(by_ids), ref, atol=ATOL, rtol=0)


def test_transformers_honours_a_custom_4d_mask(qwen2_checkpoint: MakeCheckpoint) -> None:
    # Guards the block-mode tests below: if the reference ignored the mask they would prove nothing.
    _, hf = qwen2_checkpoint()
    ids = ids_for(1, 8)
    causal = hf_logits(hf, ids)
    torch.testing.assert_close(hf_logits(hf, ids, block_mask(list(range(8)), 1)), causal)
    assert not torch.allclose(hf_logits(hf, ids, block_mask(list(range(8)), 4)), causal, atol=1e-2)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5, 16])
def test_block_mode_matches_transformers_with_block_mask(qwen2_checkpoint: MakeCheckpoint, block_size: int) -> None:
    path, hf = qwen2_checkpoint()
    ours = load_ours(path)
    ids = ids_for(2, 11)
    with torch.no_grad():
        got = ours.logits(ours(ids, mode=AttentionMode.BLOCK, block_size=block_size))
    ref = hf_logits(hf, ids, block_mask(list(range(11)), block_size))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_block_mode_window_starting_mid_block(qwen2_checkpoint: MakeCheckpoint) -> None:
    # Without a cache, start only offsets slots and positions; block edges stay at absolute multiples.
    path, hf = qwen2_checkpoint()
    ours = load_ours(path)
    start, length, block = 6, 9, 4
    slots = list(range(start, start + length))
    ids = ids_for(1, length)
    with torch.no_grad():
        got = ours.logits(ours(ids, start=start, mode="block", block_size=block))
    ref = hf_logits(hf, ids, block_mask(slots, block), position_ids=torch.tensor([slots]))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("prefix_mode", "window_mode"), [
    (AttentionMode.BLOCK, AttentionMode.BIDIRECTIONAL),
    (AttentionMode.CAUSAL, AttentionMode.BIDIRECTIONAL),
    (AttentionMode.BLOCK, AttentionMode.CAUSAL),
    (AttentionMode.BLOCK, AttentionMode.BLOCK),
])
@pytest.mark.parametrize("prefix_len", [8, 6])
def test_window_step_against_cached_prefix(qwen2_checkpoint: MakeCheckpoint, prefix_mode: AttentionMode,
                                           window_mode: AttentionMode, prefix_len: int) -> None:
    """One decoding step: the window is run against the cached prefix without writing its K/V; that must
    equal the same window inside one full forward whose mask gives the window exactly that view."""
    path, hf = qwen2_checkpoint()
    ours = load_ours(path)
    block, window = 4, 4
    total = prefix_len + window
    ids = ids_for(2, total)
    mask = []
    for q in range(total):
        row = []
        for k in range(total):
            if q < prefix_len:
                # The prefix was computed before the window existed, even where a block straddles both.
                seen = k < prefix_len and (k <= q if prefix_mode is AttentionMode.CAUSAL else k // block <= q // block)
            elif window_mode is AttentionMode.CAUSAL:
                seen = k <= q
            elif window_mode is AttentionMode.BLOCK:
                seen = k // block <= q // block
            else:
                seen = True  # the window sees the prefix and all of itself
            row.append(seen)
        mask.append(row)
    cache = ours.new_cache(capacity=32, batch=2)
    with torch.no_grad():
        ours(ids[:, :prefix_len], cache=cache, start=0, mode=prefix_mode, block_size=block)
        got = ours.logits(ours(ids[:, prefix_len:], cache=cache, start=prefix_len, mode=window_mode,
                               block_size=block, write_kv=False))
    ref = hf_logits(hf, ids, mask)[:, prefix_len:]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
