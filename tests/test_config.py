"""Reading HF config.json files (Qwen2, Qwen2.5-VL) into ModelConfig, and writing them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockpilot.vla.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_END_TOKEN_ID,
    DEFAULT_MASK_TOKEN_ID,
    DEFAULT_NULL_TOKEN_ID,
    DEFAULT_SUB_BLOCK_SIZE,
    BlockDiffusionConfig,
    ConfigError,
    LMConfig,
    ModelConfig,
    SpecialTokens,
    VisionConfig,
)
from blockpilot.vla.hf_config import QWEN2_5_VL_ROPE_THETA, QWEN2_ROPE_THETA, config_from_hf, config_to_hf, load_config

SOURCE = "/ckpt/config.json"
QWEN2_VOCAB = 151936  # the Qwen2 tokenizer's padded vocabulary: holds the documented default ids


def hub_qwen2(**overrides: Any) -> dict[str, Any]:
    """A flat config in the style of the Qwen2 / Fast-dLLM v2 hub checkpoints (pre-transformers-5)."""
    base = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "use_sliding_window": False,
        "sliding_window": 4096, "bos_token_id": 200, "eos_token_id": 201,
        "bd_size": 16, "sub_block_size": 4, "mask_token_id": 250, "null_token_id": 251,
    }
    return {**base, **overrides}


def tiny_vl_text(**overrides: Any) -> dict[str, Any]:
    base = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": 201, "bos_token_id": 200,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
    return {**base, **overrides}


TINY_VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
               "fullatt_block_indexes": [1, 3], "window_size": 56, "patch_size": 14, "spatial_merge_size": 2,
               "temporal_patch_size": 2, "in_channels": 3}
VL_TOKENS = {"image_token_id": 240, "vision_start_token_id": 241, "vision_end_token_id": 242}


def transformers_vl_dict(**top: Any) -> dict[str, Any]:
    import transformers
    config = transformers.Qwen2_5_VLConfig(text_config=tiny_vl_text(), vision_config=dict(TINY_VISION),
                                           **VL_TOKENS, **top)
    data: dict[str, Any] = config.to_dict()
    return data


# ---- reading ------------------------------------------------------------------------------------

def test_flat_qwen2_hub_config() -> None:
    config = config_from_hf(hub_qwen2(), SOURCE)
    assert config.architecture == "qwen2" and config.vision is None
    assert config.lm == LMConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8,
                                 num_kv_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, max_position=4096,
                                 tie_word_embeddings=True)
    assert config.tokens == SpecialTokens(mask=250, null=251, end=201)
    assert config.diffusion == BlockDiffusionConfig(block_size=16, sub_block_size=4)


def test_transformers5_qwen2_config() -> None:
    import transformers
    hf = transformers.Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, eos_token_id=[7, 9],
                                  pad_token_id=3, bd_size=8, mask_token_id=100, null_token_id=101).to_dict()
    config = config_from_hf(hf, SOURCE)
    assert (config.lm.head_dim, config.lm.num_kv_heads, config.lm.rope_theta) == (16, 1, QWEN2_ROPE_THETA)
    assert config.tokens == SpecialTokens(mask=100, null=101, end=7, pad=3)
    assert config.diffusion == BlockDiffusionConfig(block_size=8, sub_block_size=DEFAULT_SUB_BLOCK_SIZE)


def test_nested_transformers5_qwen2_5_vl_config() -> None:
    config = config_from_hf(transformers_vl_dict(bd_size=8, sub_block_size=2, mask_token_id=250,
                                                 null_token_id=251), SOURCE)
    assert config.architecture == "qwen2_5_vl"
    assert config.lm.mrope_section == (2, 3, 3) and config.lm.head_dim == 16 and config.lm.hidden_size == 64
    assert config.lm.rope_theta == 1e6 and not config.lm.tie_word_embeddings
    assert config.vision == VisionConfig(depth=4, hidden_size=32, intermediate_size=48, num_heads=2,
                                         out_hidden_size=64, window_size=56, fullatt_block_indexes=(1, 3))
    assert config.tokens == SpecialTokens(mask=250, null=251, end=201, image=240, vision_start=241,
                                          vision_end=242)
    assert config.diffusion == BlockDiffusionConfig(8, 2)


def test_flat_pre_v5_qwen2_5_vl_config() -> None:
    # The layout of the Qwen2.5-VL / Fast-dDrive hub checkpoints: LM fields at the top, rope_scaling.
    hf = {"model_type": "qwen2_5_vl", **tiny_vl_text(), "rope_theta": 5e5, **VL_TOKENS,
          "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}, "vision_config": dict(TINY_VISION),
          "tie_word_embeddings": True, "bd_size": 8, "mask_token_id": 250, "null_token_id": 251}
    del hf["rope_parameters"]
    config = config_from_hf(hf, SOURCE)
    assert config.lm.mrope_section == (4, 2, 2) and config.lm.rope_theta == 5e5 and config.lm.tie_word_embeddings


def test_tie_flag_inside_text_config_only() -> None:
    hf = transformers_vl_dict(mask_token_id=250, null_token_id=251)
    hf["text_config"]["tie_word_embeddings"] = True
    assert config_from_hf(hf, SOURCE).lm.tie_word_embeddings


def test_documented_defaults_when_fields_are_absent() -> None:
    hf = hub_qwen2(vocab_size=QWEN2_VOCAB)
    for name in ("bd_size", "sub_block_size", "mask_token_id", "null_token_id", "eos_token_id", "rope_theta"):
        del hf[name]
    config = config_from_hf(hf, SOURCE)
    assert (DEFAULT_MASK_TOKEN_ID, DEFAULT_NULL_TOKEN_ID, DEFAULT_END_TOKEN_ID) == (151665, 151643, 151645)
    assert config.tokens == SpecialTokens(mask=151665, null=151643, end=151645)
    assert config.diffusion == BlockDiffusionConfig(DEFAULT_BLOCK_SIZE, DEFAULT_SUB_BLOCK_SIZE) == \
        BlockDiffusionConfig(32, 8)
    assert config.lm.rope_theta == QWEN2_ROPE_THETA


def test_our_fallbacks_agree_with_transformers() -> None:
    import transformers
    assert transformers.Qwen2Config().rope_parameters["rope_theta"] == QWEN2_ROPE_THETA
    assert transformers.Qwen2_5_VLConfig().text_config.rope_parameters["rope_theta"] == QWEN2_5_VL_ROPE_THETA
    assert list(transformers.Qwen2_5_VLConfig().vision_config.fullatt_block_indexes) == [7, 15, 23, 31]


def test_vl_fallbacks() -> None:
    text = tiny_vl_text(hidden_size=128, num_attention_heads=1, num_key_value_heads=1, vocab_size=QWEN2_VOCAB)
    vision = {k: v for k, v in TINY_VISION.items() if k != "fullatt_block_indexes"} | {"depth": 9,
                                                                                      "out_hidden_size": 128}
    hf = {"model_type": "qwen2_5_vl", **text, **VL_TOKENS, "vision_config": vision}
    del hf["rope_parameters"], hf["eos_token_id"]
    config = config_from_hf(hf, SOURCE)  # head_dim 128 = 2 * (16 + 24 + 24)
    assert config.lm.mrope_section == (16, 24, 24) and config.lm.rope_theta == QWEN2_5_VL_ROPE_THETA
    assert config.vision is not None and config.vision.fullatt_block_indexes == (7,)
    assert config.tokens.end == DEFAULT_END_TOKEN_ID


def test_block_size_alias_and_token_overrides() -> None:
    hf = hub_qwen2(block_size=8)
    del hf["bd_size"]
    config = config_from_hf(hf, SOURCE, token_overrides={"mask": 5})
    assert config.diffusion.block_size == 8 and config.tokens.mask == 5


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hub_qwen2()))
    assert load_config(tmp_path) == config_from_hf(hub_qwen2())


# ---- invalid values name the field and the file ------------------------------------------------

INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "vocab_size_str": ({"vocab_size": "256"}, "vocab_size"),
    "vocab_size_float": ({"vocab_size": 256.5}, "vocab_size"),
    "hidden_size_missing": ({"hidden_size": None}, "hidden_size"),
    "layers_zero": ({"num_hidden_layers": 0}, "num_layers"),
    "heads_not_multiple": ({"num_key_value_heads": 3}, "num_kv_heads"),
    "odd_head_dim": ({"head_dim": 7}, "head_dim"),
    "negative_head_dim": ({"head_dim": -8}, "head_dim"),
    "tie_str": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    "theta_negative": ({"rope_theta": -1.0}, "rope_theta"),
    "eps_bool": ({"rms_norm_eps": True}, "rms_norm_eps"),
    "bd_size_zero": ({"bd_size": 0}, "bd_size"),
    "sub_block_not_dividing": ({"sub_block_size": 3}, "sub_block_size"),
    "mask_outside_vocab": ({"mask_token_id": 256}, "tokens.mask"),
    "mask_equals_null": ({"null_token_id": 250}, "mask"),
    "eos_empty_list": ({"eos_token_id": []}, "eos_token_id"),
    "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    "sliding_window": ({"use_sliding_window": True}, "use_sliding_window"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act"),
    "qwen2_vl": ({"model_type": "qwen2_vl"}, "qwen2_vl"),
    "defaults_outside_small_vocab": ({"mask_token_id": None, "null_token_id": None}, "tokens.mask"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_qwen2_values(case: str) -> None:
    overrides, field_name = INVALID[case]
    with pytest.raises(ConfigError) as info:
        config_from_hf(hub_qwen2(**overrides), SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE) and field_name in message, message


INVALID_VL: dict[str, tuple[Any, str]] = {
    "no_vision_config": (lambda hf: hf.pop("vision_config"), "vision_config"),
    "vision_depth_missing": (lambda hf: hf["vision_config"].pop("depth"), "vision_config.depth"),
    "vision_depth_str": (lambda hf: hf["vision_config"].update(depth="4"), "vision_config.depth"),
    "fullatt_out_of_range": (lambda hf: hf["vision_config"].update(fullatt_block_indexes=[4]),
                             "fullatt_block_indexes"),
    "fullatt_not_list": (lambda hf: hf["vision_config"].update(fullatt_block_indexes=3), "fullatt_block_indexes"),
    "window_not_multiple": (lambda hf: hf["vision_config"].update(window_size=50), "window_size"),
    "out_hidden_mismatch": (lambda hf: hf["vision_config"].update(out_hidden_size=32), "out_hidden_size"),
    "mrope_wrong_sum": (lambda hf: hf["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
                        "mrope_section"),
    "mrope_negative": (lambda hf: hf["text_config"]["rope_parameters"].update(mrope_section=[10, -1, -1]),
                       "mrope_section"),
    "no_image_token": (lambda hf: hf.update(image_token_id=None), "tokens.image"),
}


@pytest.mark.parametrize("case", list(INVALID_VL))
def test_invalid_qwen2_5_vl_values(case: str) -> None:
    edit, field_name = INVALID_VL[case]
    hf = transformers_vl_dict(mask_token_id=250, null_token_id=251)
    edit(hf)
    with pytest.raises(ConfigError) as info:
        config_from_hf(hf, SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE) and field_name in message, message


def test_from_dict_rejects_unknown_fields() -> None:
    data = config_from_hf(hub_qwen2()).to_dict()
    data["lm"]["n_layers"] = 3
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict(data)


# ---- writing: config_to_hf is the inverse of config_from_hf -------------------------------------

@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    vl = draw(st.booleans())
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.integers(1, 3))
    if vl:
        sections = draw(st.lists(st.integers(0, 6), min_size=3, max_size=3).filter(lambda s: sum(s) > 0))
        head_dim = 2 * sum(sections)
        hidden = heads * head_dim
    else:
        head_dim = 2 * draw(st.integers(1, 12))
        hidden = draw(st.integers(1, 96))
    vocab = draw(st.integers(6, 300))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=6, max_size=6, unique=True))
    optional = [draw(st.one_of(st.none(), st.just(i))) for i in ids[3:]]
    block = draw(st.integers(1, 64))
    lm = LMConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=draw(st.integers(1, 128)),
        num_layers=draw(st.integers(1, 6)), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rope_theta=draw(st.floats(1.0, 1e7)), rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 3.3e-7])),
        max_position=draw(st.integers(1, 1 << 17)), tie_word_embeddings=draw(st.booleans()),
        mrope_section=tuple(sections) if vl else None,
    )
    vision = None
    if vl:
        depth = draw(st.integers(1, 8))
        merge, patch = draw(st.integers(1, 3)), draw(st.sampled_from([7, 14, 16]))
        vheads = draw(st.integers(1, 4))
        vision = VisionConfig(
            depth=depth, hidden_size=vheads * 2 * draw(st.integers(1, 8)), intermediate_size=draw(st.integers(1, 64)),
            num_heads=vheads, out_hidden_size=hidden, patch_size=patch,
            temporal_patch_size=draw(st.integers(1, 2)), spatial_merge_size=merge,
            window_size=patch * merge * draw(st.integers(1, 8)),
            fullatt_block_indexes=tuple(draw(st.lists(st.integers(0, depth - 1), unique=True, max_size=3))),
            in_channels=draw(st.sampled_from([1, 3])),
        )
    tokens = SpecialTokens(mask=ids[0], null=ids[1], end=ids[2], pad=optional[0],
                           image=ids[4] if vl else optional[1], vision_start=optional[2],
                           vision_end=optional[2])
    return ModelConfig(lm=lm, vision=vision, tokens=tokens,
                       diffusion=BlockDiffusionConfig(block, block // draw(st.sampled_from([1, 2, 4]))
                                                      if block % 4 == 0 else block),
                       architecture="qwen2_5_vl" if vl else "qwen2")


@settings(max_examples=80, deadline=None)
@given(config=model_configs())
def test_config_to_hf_round_trips(config: ModelConfig) -> None:
    hf = json.loads(json.dumps(config_to_hf(config)))  # through JSON, as a config.json would be
    assert config_from_hf(hf, SOURCE) == config


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_written_config_reads_the_same_through_transformers(tied: bool) -> None:
    import transformers
    config = config_from_hf(hub_qwen2(head_dim=16, tie_word_embeddings=tied, pad_token_id=7), SOURCE)
    written = config_to_hf(config)
    assert {"bd_size", "sub_block_size", "mask_token_id", "null_token_id", "eos_token_id"} <= written.keys()
    again = transformers.Qwen2Config.from_dict(written).to_dict()
    assert config_from_hf(again, SOURCE) == config


def test_qwen2_5_vl_written_config_reads_the_same_through_transformers() -> None:
    import transformers
    config = config_from_hf(transformers_vl_dict(bd_size=8, sub_block_size=4, mask_token_id=250,
                                                 null_token_id=251, tie_word_embeddings=True), SOURCE)
    written = config_to_hf(config)
    assert written["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    again = transformers.Qwen2_5_VLConfig.from_dict(written).to_dict()
    assert config_from_hf(again, SOURCE) == config


def test_config_to_hf_refuses_what_qwen2_5_vl_cannot_express() -> None:
    lm = LMConfig(vocab_size=256, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2,
                  mrope_section=(2, 3, 3))
    vision = VisionConfig(depth=1, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=64,
                          fullatt_block_indexes=())
    tokens = SpecialTokens(mask=1, null=2, end=3, image=4)
    with pytest.raises(ConfigError, match="vision tower"):
        config_to_hf(ModelConfig(lm=lm, tokens=tokens, architecture="qwen2_5_vl"))
    odd = LMConfig(vocab_size=256, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8, mrope_section=(2, 1, 1))
    with pytest.raises(ConfigError, match="head_dim"):
        config_to_hf(ModelConfig(lm=odd, vision=vision, tokens=tokens, architecture="qwen2_5_vl"))
