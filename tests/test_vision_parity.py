"""Parity of the Qwen2.5-VL path (image preprocessing, vision tower, 3-D RoPE, logits) with transformers.

A tiny random Qwen2.5-VL is built with transformers offline, saved, and loaded through our config
reader and checkpoint mapping. Weights are redrawn at unit scale: with transformers' 0.02 init,
attention is nearly uniform and position or window mistakes would hide under the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from blockpilot.vla.checkpoint import load_weights
from blockpilot.vla.config import VisionConfig
from blockpilot.vla.hf_config import load_config
from blockpilot.vla.image import image_patches
from blockpilot.vla.image_grid import smart_resize
from blockpilot.vla.image_policy import ImagePolicy
from blockpilot.vla.model import VLAModel
from blockpilot.vla.rope_index import image_token_counts
from blockpilot.vla.vision import VisionTower, image_inputs, vision_layout

IMAGE, VIDEO, VISION_START, VISION_END, MASK, NULL, EOS, BOS = range(390, 398)
# Both image sizes are multiples of patch*merge = 8 and larger than the 16-pixel windows, so
# windowed blocks see several (some partial) windows per image.
IMAGE_SHAPES = ((48, 40, 3), (24, 32, 3))


def _redraw(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            eos_token_id=EOS, bos_token_id=BOS, mask_token_id=MASK, null_token_id=NULL,
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
            spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1], out_hidden_size=64,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    _redraw(model)
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def ours(reference: tuple[Any, Path]) -> VLAModel:
    config = load_config(reference[1])
    model = VLAModel(config).eval()
    load_weights(model, reference[1], "qwen2_5_vl")
    return model


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in IMAGE_SHAPES[:count]]


def _prompt(grid_thw: torch.Tensor) -> torch.Tensor:
    ids = [1, 2, 3]
    for n in image_token_counts(grid_thw, 2):
        ids += [VISION_START] + [IMAGE] * n + [VISION_END, 5, 6]
    return torch.tensor([[*ids, 7, 8, 9]])


def _smooth_image(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).random(shape)
    ramp = noise.cumsum(0).cumsum(1)
    ramp = (ramp - ramp.min(axis=(0, 1))) / np.ptp(ramp, axis=(0, 1))
    return np.ascontiguousarray((ramp * 255).astype(np.uint8))


def _reference_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


def _vision(patch: int = 14) -> VisionConfig:
    return VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        patch_size=patch, window_size=8 * patch, fullatt_block_indexes=())


def test_patches_match_reference_processor_without_resize() -> None:
    processor = _reference_processor()
    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)  # multiples of 28
    ref = processor(image, return_tensors="np")
    patches, grid = image_patches(image, ImagePolicy())
    assert [list(grid)] == ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-6)


# Odd-sized camera frames (every one is resized): nuScenes' 1600x900 landscape, portrait and landscape 333x517, a
# WOD-E2E side camera, and frames small enough to be scaled up to min_pixels.
ODD_FRAMES = ((900, 1600), (517, 333), (333, 517), (886, 1920), (100, 150), (30, 40))


@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_resized_patches_equal_the_reference_processor(kind: str) -> None:
    """The one host-side path (Pillow bicubic to the smart-resized size, rescale, CLIP normalization, patches)
    gives the reference processor's pixel values to float32 rounding, and its grid, on frames that need a
    resize; noise is the hard case for a resize kernel (a different filter is off by tens of grey levels)."""
    processor = _reference_processor()
    policy = ImagePolicy()
    for i, (h, w) in enumerate(ODD_FRAMES):
        image = _smooth_image((h, w, 3), seed=i) if kind == "smooth" else \
            np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = processor(image, return_tensors="np")
        patches, grid = image_patches(image, policy)
        assert [list(grid)] == ref["image_grid_thw"].tolist(), (h, w)
        assert policy.target_size(h, w) != (h, w)  # every frame here is resized
        np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=2e-6, err_msg=f"{w}x{h}")


def test_several_frames_and_a_checkpoint_budget_match_the_reference_processor() -> None:
    """Frames of different sizes in one call, under a small pixel budget (as the reference model's
    preprocessor_config.json sets): concatenated patches and grid_thw as the processor gives them."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    frames = [np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ODD_FRAMES[:4]]
    ref = processor(frames, return_tensors="np")
    patches, grid = image_inputs(frames, _vision(), min_pixels=56 * 56, max_pixels=112 * 112)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    np.testing.assert_allclose(patches.numpy(), ref["pixel_values"], rtol=0, atol=2e-6)


def test_smart_resize_dimensions() -> None:
    assert smart_resize(56, 84, 28) == (56, 84)
    assert smart_resize(42, 70, 28) == (56, 56)  # 1.5 and 2.5 round half to even
    assert smart_resize(10, 20, 28) == (56, 84)  # scaled up to min_pixels
    assert smart_resize(2000, 3000, 28) == (812, 1204)  # scaled down under max_pixels
    assert smart_resize(1, 150, 28) == (28, 700)  # thin strips keep one row of patches
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 28)
    for h, w in ((17, 923), (480, 640), (900, 1600), (1080, 1920), (4000, 300)):
        rh, rw = smart_resize(h, w, 28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 56 * 56 <= rh * rw <= 28 * 28 * 1280
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for h in range(8, 3000, 97):
        for w in range(8, 3000, 131):
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28) == tuple(reference(h, w, factor=28)), (h, w)


def test_vision_tower_matches_transformers(reference: tuple[Any, Path], ours: VLAModel) -> None:
    hf, _ = reference
    assert ours.visual is not None
    pixels, grid = image_inputs(_images(2), ours.visual.config, min_pixels=64)
    layout = vision_layout(grid, ours.visual.config)
    assert int(layout.window_id.unique().numel()) > 4  # windowing really splits both images
    with torch.no_grad():
        expected = hf.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours.visual(pixels, grid)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # The same weights with full attention everywhere must differ: the windows are not a no-op.
    full = VisionTower(dataclasses.replace(ours.visual.config, fullatt_block_indexes=(0, 1, 2)))
    full.load_state_dict(ours.visual.state_dict())
    with torch.no_grad():
        assert (full(pixels, grid) - expected).abs().max() > 1e-2


def _tower_config(model: VLAModel) -> VisionConfig:
    assert model.config.vision is not None
    return model.config.vision


def test_rope_index_matches_transformers(reference: tuple[Any, Path], ours: VLAModel) -> None:
    hf, _ = reference
    _, grid = image_inputs(_images(2), _tower_config(ours), min_pixels=64)
    ids = _prompt(grid)
    expected, expected_delta = hf.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=grid)
    positions, delta = ours.rope_index(ids, grid)
    assert torch.equal(positions, expected)
    assert delta.tolist() == expected_delta.flatten().tolist()


@pytest.mark.parametrize("num_images", [1, 2])
def test_logits_match_transformers(reference: tuple[Any, Path], ours: VLAModel, num_images: int) -> None:
    hf, _ = reference
    pixels, grid = image_inputs(_images(num_images), _tower_config(ours), min_pixels=64)
    ids = _prompt(grid)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                      mm_token_type_ids=(ids == IMAGE).int()).logits
        got = ours.logits(ours(ids, pixel_values=pixels, grid_thw=grid))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_old_hub_layout_gives_identical_logits(reference: tuple[Any, Path], ours: VLAModel,
                                               tmp_path: Path) -> None:
    _, path = reference
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {}
    for name, tensor in tensors.items():
        # The original Qwen2.5-VL hub layout: model.* is the LM, visual.* the tower.
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        renamed[name] = tensor
    assert any(n.startswith("visual.blocks.") for n in renamed) and "lm_head.weight" in renamed
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "config.json")
    assert "text_config" in json.loads((tmp_path / "config.json").read_text())
    old = VLAModel(load_config(tmp_path)).eval()
    load_weights(old, tmp_path, "qwen2_5_vl")
    pixels, grid = image_inputs(_images(2), _tower_config(ours), min_pixels=64)
    ids = _prompt(grid)
    with torch.no_grad():
        assert torch.equal(old.logits(old(ids, pixel_values=pixels, grid_thw=grid)),
                           ours.logits(ours(ids, pixel_values=pixels, grid_thw=grid)))
