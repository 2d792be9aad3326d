"""VLAModel without transformers: KV-cache consistency on the image path, 3-D positions, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blockpilot.vla.config import LMConfig, ModelConfig, SpecialTokens, VisionConfig
from blockpilot.vla.model import VLAModel, rope_continuation
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.rope_index import image_token_counts, mrope_positions
from blockpilot.vla.vision import image_inputs, vision_layout

IMAGE, VISION_START, VISION_END = 390, 392, 393


def _config(vision: bool = True) -> ModelConfig:
    lm = LMConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, rope_theta=10_000.0, max_position=512, mrope_section=(2, 3, 3))
    tower = VisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                         patch_size=4, window_size=16, fullatt_block_indexes=(1,))
    tokens = SpecialTokens(mask=394, null=395, end=396, image=IMAGE, vision_start=VISION_START,
                           vision_end=VISION_END)
    return ModelConfig(lm=lm, vision=tower if vision else None, tokens=tokens, architecture="qwen2_5_vl")


@pytest.fixture(scope="module")
def model() -> VLAModel:
    torch.manual_seed(0)
    m = VLAModel(_config()).eval()
    # Unit-scale weights: attention far from uniform, so a wrong position or cache slot shows.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(p[0].numel()))
            else:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return m


def _image_prompt(
    model: VLAModel, shapes: tuple[tuple[int, int, int], ...] = ((48, 40, 3),)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vision = model.config.vision
    assert vision is not None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    pixels, grid = image_inputs(images, vision, min_pixels=64)
    ids = [1, 2]
    for n in image_token_counts(grid, 2):
        ids += [VISION_START] + [IMAGE] * n + [VISION_END]
    return torch.tensor([[*ids, 3, 4, 5]]), pixels, grid


def test_prefill_with_image_then_cached_continuation_matches_full_forward(model: VLAModel) -> None:
    prompt, pixels, grid = _image_prompt(model)
    generated = torch.tensor([[11, 12, 13, 14, 15, 16]])
    full_ids = torch.cat((prompt, generated), dim=1)
    with torch.no_grad():
        full = model.logits(model(full_ids, pixel_values=pixels, grid_thw=grid))
        cache = model.new_cache(capacity=full_ids.shape[1] + 4)
        p = prompt.shape[1]
        got = [model.logits(model(prompt, pixel_values=pixels, grid_thw=grid, cache=cache))]
        _, delta = model.rope_index(prompt, grid)
        for start, stop in ((p, p + 2), (p + 2, p + 6)):
            positions = rope_continuation(start, stop - start, delta)
            hidden = model(full_ids[:, start:stop], position_ids=positions, cache=cache, start=start)
            got.append(model.logits(hidden))
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0, atol=1e-4)


def test_continuation_positions_extend_the_prompt_positions(model: VLAModel) -> None:
    prompt, _, grid = _image_prompt(model, ((48, 40, 3), (24, 32, 3)))
    full_ids = torch.cat((prompt, torch.tensor([[7, 8, 9]])), dim=1)
    full_positions, full_delta = model.rope_index(full_ids, grid)
    _, delta = model.rope_index(prompt, grid)
    assert torch.equal(delta, full_delta)
    p = prompt.shape[1]
    assert torch.equal(rope_continuation(p, 3, delta), full_positions[:, :, p:])


def test_block_diffusion_step_after_image_prefill_leaves_cache_unchanged(model: VLAModel) -> None:
    prompt, pixels, grid = _image_prompt(model)
    p = prompt.shape[1]
    block = torch.tensor([[394, 394, 394, 394]])
    with torch.no_grad():
        cache = model.new_cache(capacity=p + 8)
        model(prompt, pixel_values=pixels, grid_thw=grid, cache=cache)
        _, delta = model.rope_index(prompt, grid)
        before = cache.k.clone()
        positions = rope_continuation(p, 4, delta)
        step = model(block, position_ids=positions, cache=cache, start=p,
                     mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
        assert torch.equal(cache.k, before)
        # The same step writing into a second cache gives the same hidden states.
        other = model.new_cache(capacity=p + 8)
        model(prompt, pixel_values=pixels, grid_thw=grid, cache=other)
        ref = model(block, position_ids=positions, cache=other, start=p, mode=AttentionMode.BIDIRECTIONAL)
        assert not torch.equal(other.k, before)
    torch.testing.assert_close(step, ref, rtol=0, atol=1e-5)


def test_rope_index_by_hand() -> None:
    # One 4x6-patch image (2x3 merged tokens) between two text pairs.
    ids = torch.tensor([[1, 2, *[IMAGE] * 6, 3, 4]])
    positions, delta = mrope_positions(ids, torch.tensor([[1, 4, 6]]), IMAGE, 2)
    assert positions[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert delta.tolist() == [7 - 10]


def test_adjacent_images_need_no_separator() -> None:
    ids = torch.tensor([[1, *[IMAGE] * 4, 2]])
    positions, delta = mrope_positions(ids, torch.tensor([[1, 2, 4], [1, 4, 2]]), IMAGE, 2)
    # first image: 1x2 merged tokens at 1; second: 2x1 at 1 + 2 = 3; the text after at 3 + 2 = 5
    assert positions[:, 0].tolist() == [[0, 1, 1, 3, 3, 5], [0, 1, 1, 3, 4, 5], [0, 1, 2, 3, 3, 5]]
    assert delta.tolist() == [0]


def test_mismatched_image_token_count_raises(model: VLAModel) -> None:
    prompt, pixels, grid = _image_prompt(model)
    n = image_token_counts(grid, 2)[0]
    short = prompt[prompt != IMAGE][None]
    short = torch.cat((short[:, :3], torch.full((1, n - 1), IMAGE), short[:, 3:]), dim=1)
    with pytest.raises(ValueError, match=rf"{n - 1} image token\(s\) but .* need {n}"):
        model(short, pixel_values=pixels, grid_thw=grid)
    with pytest.raises(ValueError, match=rf"{n - 1} image token\(s\) but the images give {n} feature"):
        model.embed(short, model.encode_images(pixels, grid))
    # Right count, but a text token breaks the image's run in two.
    split = torch.tensor([[1, 2, VISION_START, *[IMAGE] * (n - 1), 7, IMAGE, VISION_END, 3]])
    with pytest.raises(ValueError, match="consecutive image tokens"):
        model.rope_index(split, grid)


def test_images_encoded_together_equal_images_encoded_alone(model: VLAModel) -> None:
    _, pixels, grid = _image_prompt(model, ((48, 40, 3), (24, 32, 3)))
    assert model.visual is not None
    first = int(grid[0].prod())
    with torch.no_grad():
        both = model.visual(pixels, grid)
        alone = torch.cat((model.visual(pixels[:first], grid[:1]), model.visual(pixels[first:], grid[1:])))
    torch.testing.assert_close(both, alone, rtol=0, atol=1e-5)


def test_window_layout_is_a_permutation_into_bounded_windows() -> None:
    vision = _config().vision
    assert vision is not None
    layout = vision_layout(torch.tensor([[1, 12, 10], [1, 6, 8]]), vision)
    units = 6 * 5 + 3 * 4
    assert sorted(layout.unit_order.tolist()) == list(range(units))
    windows = layout.window_id[::4]
    assert int(windows.unique().numel()) == 3 * 3 + 2 * 2  # partial windows at the right/bottom edges
    assert int(torch.bincount(windows).max()) <= 4
    # Windows and frames are contiguous runs in window order.
    assert torch.all(layout.window_id.diff() >= 0) and torch.all(layout.frame_id.diff() >= 0)


def test_text_only_model_runs_and_refuses_images() -> None:
    m = VLAModel(_config(vision=False)).eval()
    assert m.visual is None
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert m.logits(m(ids)).shape == (1, 3, 400)
    with pytest.raises(ValueError, match="no vision tower"):
        m.encode_images(torch.zeros(4, 96), torch.tensor([[1, 2, 2]]))
