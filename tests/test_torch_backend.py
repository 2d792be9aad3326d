"""TorchBackend: the cache bookkeeping of fork / truncate / prefill, typed errors for bad calls,
prompts it must refuse, the mask token never predicted, and seeded sampling keyed by cache slot."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from runtime_fixtures import TEXT_MASK, image_prompt, reference, text_model

from blockpilot.runtime.backend import Backend, CacheFullError, Prompt, PromptError, Sampling, StepResult
from blockpilot.runtime.sampling import gumbel_keys
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.vision import image_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

CAUSAL, BIDIR = AttentionMode.CAUSAL, AttentionMode.BIDIRECTIONAL


@pytest.fixture(scope="module")
def prompt() -> Prompt:
    return image_prompt(reference(0)[1], text_tokens=20)


def _backend(capacity: int = 128, max_batch: int = 1) -> TorchBackend:
    return TorchBackend(reference(0)[0], capacity, max_batch)


def _tokens(rows: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 700, (rows, n))


def _same(a: StepResult, b: StepResult) -> None:
    assert np.array_equal(a.top1, b.top1)
    np.testing.assert_allclose(a.prob, b.prob, rtol=1e-4, atol=1e-5)


def test_is_a_backend(prompt: Prompt) -> None:
    backend: Backend = _backend()
    assert (backend.length, backend.capacity) == (0, 128)
    res = backend.prefill(prompt)
    assert res.top1.shape == res.prob.shape == (1, 1) and res.sampled is None
    assert backend.length == len(prompt)


def test_prefill_predicts_what_a_cached_continuation_predicts(prompt: Prompt) -> None:
    # Prefill all but the last token, then step it: the multimodal RoPE continuation must agree.
    backend = _backend()
    full = backend.prefill(prompt)
    backend.prefill(prompt, length=len(prompt) - 1)
    assert backend.length == len(prompt) - 1
    _same(backend.step(prompt.token_ids[None, -1:], len(prompt) - 1, mode=CAUSAL, write_kv=True), full)


def test_fork_leaves_the_parent_cache_intact(prompt: Prompt) -> None:
    backend, single = _backend(max_batch=3), _backend()
    backend.prefill(prompt)
    parent = len(prompt)
    k, v = backend._single.k.clone(), backend._single.v.clone()
    backend.fork(3)
    rows = _tokens(3, 6)
    forked = backend.step(rows, parent, mode=BIDIR, write_kv=True)
    backend.step(rows[:, :2], parent + 6, mode=CAUSAL, write_kv=True)
    assert backend.length == parent + 8
    # The batch-one cache is untouched, and every forked row starts from its prefix.
    assert torch.equal(backend._single.k, k) and torch.equal(backend._single.v, v)
    multi = backend._multi
    assert multi is not None
    for r in range(3):
        assert torch.equal(multi.k[:, r, :, :parent], k[:, 0, :, :parent])
        assert torch.equal(multi.v[:, r, :, :parent], v[:, 0, :, :parent])
        # Each row predicts what a batch-one step from the same prefix predicts.
        single.prefill(prompt)
        alone = single.step(rows[r: r + 1], parent, mode=BIDIR, write_kv=False)
        _same(StepResult(forked.top1[r: r + 1], forked.prob[r: r + 1]), alone)


def test_truncate_then_step_rewrites_the_forgotten_slots(prompt: Prompt) -> None:
    backend, fresh = _backend(max_batch=2), _backend(max_batch=2)
    p = len(prompt)
    first, second, third = _tokens(2, 7, 1), _tokens(2, 3, 2), _tokens(2, 2, 3)
    backend.prefill(prompt)
    backend.fork(2)
    backend.step(first, p, mode=CAUSAL, write_kv=True)
    backend.truncate(p)
    assert backend.length == p
    backend.step(second, p, mode=CAUSAL, write_kv=True)
    got = backend.step(third, p + 3, mode=CAUSAL, write_kv=True)
    # Same as never having written ``first``: its stale slots p+3.. are neither seen nor kept.
    fresh.prefill(prompt)
    fresh.fork(2)
    fresh.step(second, p, mode=CAUSAL, write_kv=True)
    _same(got, fresh.step(third, p + 3, mode=CAUSAL, write_kv=True))
    assert backend._multi is not None and fresh._multi is not None
    end = p + 5
    torch.testing.assert_close(backend._multi.k[:, :2, :, :end], fresh._multi.k[:, :2, :, :end])


def test_step_without_write_kv_leaves_the_cache_alone(prompt: Prompt) -> None:
    backend = _backend()
    backend.prefill(prompt)
    k = backend._single.k.clone()
    backend.step(_tokens(1, 8), len(prompt), mode=BIDIR, write_kv=False)
    assert backend.length == len(prompt) and torch.equal(backend._single.k, k)


def test_prefill_after_a_fork_resets_to_batch_one(prompt: Prompt) -> None:
    backend = _backend(max_batch=3)
    backend.prefill(prompt)
    backend.fork(3)
    backend.step(_tokens(3, 4), len(prompt), mode=CAUSAL, write_kv=True)
    n = len(prompt) - 3
    backend.prefill(prompt, length=n)
    assert backend.length == n
    with pytest.raises(ValueError, match=r"shape \(1, T>0\)"):
        backend.step(_tokens(3, 2), n, mode=CAUSAL, write_kv=True)
    backend.step(prompt.token_ids[None, n:], n, mode=CAUSAL, write_kv=True)
    backend.fork(2)  # forking again works from the fresh batch-one cache


def test_fork_limits(prompt: Prompt) -> None:
    backend = _backend(max_batch=2)
    backend.prefill(prompt)
    with pytest.raises(ValueError, match="max_batch 2"):
        backend.fork(3)
    with pytest.raises(ValueError, match="at least one row"):
        backend.fork(0)
    backend.fork(1)  # a no-op
    backend.fork(2)
    with pytest.raises(ValueError, match="batch-one"):
        backend.fork(2)
    single = _backend()
    single.prefill(prompt)
    with pytest.raises(ValueError, match="max_batch 1"):
        single.fork(2)
    with pytest.raises(ValueError, match="positive"):
        TorchBackend(reference(0)[0], 0)


def test_truncate_limits(prompt: Prompt) -> None:
    backend = _backend()
    backend.prefill(prompt)
    for bad in (len(prompt) + 1, -1):
        with pytest.raises(ValueError, match=rf"truncate\({bad}\)"):
            backend.truncate(bad)
    backend.truncate(0)
    assert backend.length == 0


def test_step_refuses_a_gap_and_a_kv_end_past_the_cache(prompt: Prompt) -> None:
    backend = _backend()
    backend.prefill(prompt)
    p = len(prompt)
    with pytest.raises(ValueError, match="gap"):
        backend.step(_tokens(1, 2), p + 1, mode=CAUSAL, write_kv=True)
    with pytest.raises(ValueError, match="outside"):
        backend.step(_tokens(1, 2), -1, mode=CAUSAL, write_kv=True)
    with pytest.raises(ValueError, match="kv_end"):
        backend.step(_tokens(1, 2), p, mode=CAUSAL, write_kv=True, kv_end=p + 5)
    assert backend.length == p


@pytest.mark.parametrize(("tokens", "message"), [
    (np.array([5, 6]), r"shape \(1, T>0\), got \(2,\)"),
    (np.zeros((2, 3), np.int64), r"shape \(1, T>0\), got \(2, 3\)"),
    (np.zeros((1, 0), np.int64), r"shape \(1, T>0\), got \(1, 0\)"),
    (np.array([[5, -1]]), r"\[0, 768\), got range \[-1, 5\]"),
    (np.array([[768]]), r"\[0, 768\), got range \[768, 768\]"),
])
def test_bad_tokens_raise_value_errors_naming_shape_or_range(prompt: Prompt, tokens: np.ndarray,
                                                             message: str) -> None:
    backend = _backend()
    backend.prefill(prompt)
    with pytest.raises(ValueError, match=message):
        backend.step(tokens, len(prompt), mode=CAUSAL, write_kv=True)


def test_a_full_cache_raises_cache_full_and_changes_nothing(prompt: Prompt) -> None:
    p = len(prompt)
    backend = _backend(capacity=p + 4)
    backend.prefill(prompt)
    with pytest.raises(CacheFullError, match="capacity"):
        backend.step(_tokens(1, 5), p, mode=CAUSAL, write_kv=True)
    assert backend.length == p
    backend.step(_tokens(1, 4), p, mode=CAUSAL, write_kv=True)
    with pytest.raises(CacheFullError):
        backend.step(_tokens(1, 1), p + 4, mode=CAUSAL, write_kv=True)
    # A draft past the end is refused too: the ONNX Runtime, TensorRT and cuda backends hold every window in the
    # cache, so the shared contract (backend.check_step) asks every step to fit, and a decoder that runs on torch
    # runs on them.
    with pytest.raises(CacheFullError):
        backend.step(_tokens(1, 3), p + 4, mode=BIDIR, write_kv=False)
    assert backend.length == p + 4


def test_prompts_that_cannot_run_raise_prompt_error(prompt: Prompt) -> None:
    backend = _backend(capacity=64)
    first_image = int(np.flatnonzero(prompt.token_ids == reference(0)[1].special.image)[0])
    cases = {
        "no images were given": Prompt(prompt.token_ids),
        "past the prefill length": None,
        "does not fit": Prompt(np.concatenate([prompt.token_ids, np.full(30, 40)]), prompt.images),
        "need 16": Prompt(np.delete(prompt.token_ids, first_image), prompt.images),
        "need 32": Prompt(prompt.token_ids, prompt.images * 2),
    }
    for message, bad in cases.items():
        with pytest.raises(PromptError, match=message):
            if bad is None:
                backend.prefill(prompt, length=first_image + 3)
            else:
                backend.prefill(bad)
    with pytest.raises(PromptError, match="outside"):
        backend.prefill(prompt, length=len(prompt) + 1)
    with pytest.raises(PromptError, match="no vision tower"):
        TorchBackend(text_model(0), 64).prefill(Prompt(np.arange(5), prompt.images))
    with pytest.raises(PromptError, match="non-empty"):
        Prompt(np.zeros(0, np.int64))


def test_prefill_of_length_zero_only_resets() -> None:
    backend = TorchBackend(text_model(0), 32)
    text = Prompt(np.arange(1, 9))
    backend.prefill(text)
    res = backend.prefill(text, length=0)
    assert res.top1.shape == (1, 0) and backend.length == 0
    backend.step(text.token_ids[None], 0, mode=CAUSAL, write_kv=True)
    assert backend.length == 8


def test_the_mask_token_is_never_predicted_or_sampled(prompt: Prompt) -> None:
    model, tokenizer = reference(0)
    mask = tokenizer.special.mask
    biased = copy.deepcopy(model)
    plain_logits = biased.logits
    bonus = torch.zeros(biased.config.lm.vocab_size)
    bonus[mask] = 100.0
    biased.logits = lambda hidden: plain_logits(hidden) + bonus  # type: ignore[method-assign]
    backend = TorchBackend(biased, 128)
    backend.prefill(prompt)
    with torch.inference_mode():
        hidden = biased(torch.from_numpy(prompt.token_ids)[None][:, :2], mode=CAUSAL)
        assert int(biased.logits(hidden).argmax(-1)[0, -1]) == mask  # the mask would win
    window = np.concatenate([_tokens(1, 6), np.full((1, 6), mask)], axis=1)
    for temperature in (0.3, 5.0):
        res = backend.step(window, len(prompt), mode=BIDIR, write_kv=False,
                           sampling=Sampling(temperature, (1,)))
        assert res.sampled is not None
        assert mask not in res.top1 and mask not in res.sampled
    assert (res.prob <= 1.0).all() and (res.prob > 0).all()


def test_sampled_tokens_follow_the_slot_keyed_gumbel_rule(prompt: Prompt) -> None:
    model = reference(0)[0]
    assert model.config.vision is not None
    backend = _backend()
    backend.prefill(prompt)
    p, window, temperature = len(prompt), _tokens(1, 6), 0.7
    res = backend.step(window, p, mode=CAUSAL, write_kv=False, sampling=Sampling(temperature, (42,)))
    # The same draw from a cache-free causal forward of prompt + window and the documented noise,
    # keyed by absolute slot.
    pixels, grid = image_inputs(list(prompt.images), model.config.vision)
    with torch.inference_mode():
        ids = torch.from_numpy(np.concatenate([prompt.token_ids, window[0]]))[None]
        logits = model.logits(model(ids, pixel_values=pixels, grid_thw=grid, mode=CAUSAL)[:, p:]).float()
        logits[..., model.config.tokens.mask] = float("-inf")
        keys = gumbel_keys(torch.tensor([42]), torch.arange(p, p + 6), logits.shape[-1])
        expected = (logits / temperature + keys).argmax(-1).numpy()
    assert res.sampled is not None and np.array_equal(res.sampled, expected)
    assert np.array_equal(res.top1, logits.argmax(-1).numpy())


def test_sampling_is_reproducible_and_keyed_by_seed_and_slot_only(prompt: Prompt) -> None:
    backend = _backend(max_batch=3)
    p = len(prompt)
    backend.prefill(prompt)
    window = _tokens(1, 8)
    draw = backend.step(window, p, mode=CAUSAL, write_kv=False, sampling=Sampling(1.5, (7,))).sampled
    again = backend.step(window, p, mode=CAUSAL, write_kv=False, sampling=Sampling(1.5, (7,))).sampled
    shorter = backend.step(window[:, :5], p, mode=CAUSAL, write_kv=False, sampling=Sampling(1.5, (7,))).sampled
    other = backend.step(window, p, mode=CAUSAL, write_kv=False, sampling=Sampling(1.5, (8,))).sampled
    assert draw is not None and again is not None and shorter is not None and other is not None
    assert np.array_equal(draw, again)
    # A causal position re-verified in a shorter window draws the same token (same seed, same slot).
    assert np.array_equal(draw[:, :5], shorter)
    assert not np.array_equal(draw, other)
    # A row's draw does not depend on the other rows of the batch.
    backend.fork(3)
    rows = backend.step(np.repeat(window, 3, 0), p, mode=CAUSAL, write_kv=False,
                        sampling=Sampling(1.5, (3, 7, 9))).sampled
    assert rows is not None and np.array_equal(rows[1:2], draw)
    # A vanishing temperature draws the top-1 token.
    cold = backend.step(np.repeat(window, 3, 0), p, mode=CAUSAL, write_kv=False, sampling=Sampling(1e-6, (1, 2, 3)))
    assert cold.sampled is not None and np.array_equal(cold.sampled, cold.top1)


def test_a_wrong_seed_count_is_refused_before_anything_is_written(prompt: Prompt) -> None:
    backend = _backend(max_batch=2)
    backend.prefill(prompt)
    backend.fork(2)
    with pytest.raises(ValueError, match="2 seeds"):
        backend.step(_tokens(2, 3), len(prompt), mode=CAUSAL, write_kv=True, sampling=Sampling(1.0, (1,)))
    assert backend.length == len(prompt)


def test_sampling_options_are_validated() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Sampling(0.0, (1,))
    with pytest.raises(ValueError, match="one seed per batch row"):
        Sampling(1.0, ())


def test_text_only_model_runs_without_positions_or_images() -> None:
    backend = TorchBackend(text_model(1), 32, 2)
    text = Prompt(np.arange(1, 12))
    res = backend.prefill(text)
    assert res.top1.shape == (1, 1) and int(res.top1[0, 0]) != TEXT_MASK
    backend.fork(2)
    out = backend.step(np.array([[3, 4], [5, 6]]), 11, mode=CAUSAL, write_kv=True, sampling=Sampling(1.0, (1, 2)))
    assert out.sampled is not None and out.sampled.shape == (2, 2)
