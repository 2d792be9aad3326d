"""The image-size policy: smart resize under a checkpoint's pixel budget, the prompt budget it implies, fixed
exported sizes, and refusals of a bad ``preprocessor_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blockpilot.vla.config import VisionConfig
from blockpilot.vla.image import image_patches
from blockpilot.vla.image_policy import (
    ImagePolicy,
    ImagePolicyError,
    load_image_policy,
    parse_image_size,
    prompt_budget,
    write_preprocessor_config,
)

QWEN25_VL_MAX_PIXELS = 12845056  # Qwen2.5-VL's preprocessor_config.json


def _vision() -> VisionConfig:
    return VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                        patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                        fullatt_block_indexes=(0,), in_channels=3)


def test_nuscenes_frame_token_counts_match_the_reference_processor() -> None:
    default = ImagePolicy.for_vision(_vision())
    assert default.target_size(900, 1600) == (728, 1316) and default.tokens(900, 1600) == 1222
    qwen = ImagePolicy.for_vision(_vision(), max_pixels=QWEN25_VL_MAX_PIXELS)
    assert qwen.target_size(900, 1600) == (896, 1596) and qwen.tokens(900, 1600) == 1824
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for h, w in ((900, 1600), (1280, 1920), (886, 1920), (112, 112)):
        for policy in (default, qwen):
            assert policy.target_size(h, w) == tuple(reference(h, w, factor=28, min_pixels=policy.min_pixels,
                                                               max_pixels=policy.max_pixels))


def test_prompt_budget_follows_policy_and_cameras() -> None:
    qwen = ImagePolicy.for_vision(_vision(), max_pixels=QWEN25_VL_MAX_PIXELS)
    assert prompt_budget(qwen, 6, image_hw=(900, 1600)) == 6 * (1824 + 2) + 256
    assert prompt_budget(qwen, 1) == QWEN25_VL_MAX_PIXELS // 28 ** 2 + 2 + 256
    small = ImagePolicy.for_vision(_vision(), max_pixels=112 * 112)
    assert small.max_tokens_per_image == 16 and prompt_budget(small, 8) == 1024  # never below 1,024
    assert prompt_budget(None, 0) == 1024
    with pytest.raises(ImagePolicyError, match="cameras"):
        prompt_budget(small, -1)


def test_fixed_sizes_pick_the_nearest_aspect_ratio() -> None:
    policy = ImagePolicy.for_vision(_vision(), max_pixels=112 * 112).with_sizes(((112, 112), (56, 140)))
    assert policy.target_size(900, 1600) == (56, 140)  # its own smart size is exported
    assert policy.target_size(480, 640) == (112, 112)  # 84x112 is not: the squarer exported size is nearer
    assert policy.target_size(400, 1600) == (56, 140)
    assert policy.max_tokens_per_image == 16
    with pytest.raises(ImagePolicyError, match="multiple of 28"):
        ImagePolicy(sizes=((100, 100),))


def test_preprocessing_follows_the_policy() -> None:
    """Target size (the pixel budget, or the exported size nearest in aspect) and normalization come from the
    policy; a frame that is not HxWx3 uint8 is refused."""
    policy = ImagePolicy.for_vision(_vision(), max_pixels=112 * 112)
    image = np.random.default_rng(0).integers(0, 256, (900, 1600, 3), dtype=np.uint8)
    patches, grid = image_patches(image, policy)
    assert grid == (1, 4, 10) and patches.shape == (40, 3 * 2 * 14 * 14) and patches.dtype == np.float32
    assert image_patches(image, policy.with_sizes(((112, 112),)))[1] == (1, 8, 8)
    half = ImagePolicy.for_vision(_vision(), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    white = np.full((56, 56, 3), 255, dtype=np.uint8)
    np.testing.assert_allclose(image_patches(white, half)[0], 1.0)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        image_patches(image.astype(np.float32), policy)  # type: ignore[arg-type]


def test_preprocessor_config_round_trip_and_size_dict(tmp_path: Path) -> None:
    policy = ImagePolicy.for_vision(_vision(), max_pixels=112 * 112)
    write_preprocessor_config(tmp_path, policy)
    assert load_image_policy(tmp_path, _vision()) == policy
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136,
                                                                             "longest_edge": 50176}}))
    assert load_image_policy(tmp_path, _vision()).max_pixels == 50176
    assert ImagePolicy.from_dict(policy.to_dict(), "spec") == policy
    assert load_image_policy(tmp_path / "none", _vision()) == ImagePolicy.for_vision(_vision())


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "not readable JSON"),
    ("[1]", "expected a JSON object"),
    (json.dumps({"max_pixels": -5}), "'max_pixels' must be a positive integer"),
    (json.dumps({"min_pixels": 10000, "max_pixels": 5000}), "min_pixels .10000. exceeds max_pixels"),
    (json.dumps({"min_pixels": 100, "max_pixels": 100}), "below one merged patch"),
    (json.dumps({"patch_size": 16}), "patch_size 16 disagrees with the vision config's 14"),
    (json.dumps({"image_mean": [0.5, 0.5]}), "image_mean must be a number or three numbers"),
    (json.dumps({"size": 5}), "field 'size' must be an object"),
])
def test_bad_preprocessor_config_is_refused_naming_the_file(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(ImagePolicyError, match=match) as info:
        load_image_policy(tmp_path, _vision())
    assert "preprocessor_config.json" in str(info.value)


def test_image_size_option() -> None:
    assert parse_image_size("1600x900") == (900, 1600)
    for bad in ("1600", "0x900", "axb", "1600x900x3"):
        with pytest.raises(ImagePolicyError, match="WIDTHxHEIGHT"):
            parse_image_size(bad)


def test_the_reference_models_112_px_frames_are_unchanged() -> None:
    shipped = Path(__file__).resolve().parents[1] / "models" / "reference"
    policy = load_image_policy(shipped, _vision())
    assert policy.target_size(112, 112) == (112, 112) and policy.tokens(112, 112) == 16
    assert ImagePolicy.for_vision(_vision()).target_size(112, 112) == (112, 112)
