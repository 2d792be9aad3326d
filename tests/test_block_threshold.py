"""``block_threshold`` against a reference written without the KV cache, and its stop paths.

The reference runs the model on the whole sequence (prompt, committed blocks, current block with
masks) in ``AttentionMode.BLOCK`` at every step: that mask is exactly what the cached decoder
builds from a block-mode prefill, bidirectional commits and bidirectional denoising steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_fixtures import (
    TEXT_END,
    TEXT_MASK,
    ScriptedBackend,
    SpyBackend,
    image_prompt,
    reference,
    text_model,
)

from blockpilot.runtime.backend import Prompt
from blockpilot.runtime.decoders import BlockOptions, Decoded, block_threshold
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.vision import image_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


class FullSequenceModel:
    """Top-1 and its probability at every position of a cache-free block-mode forward."""

    def __init__(self, model: VLAModel, prompt: Prompt) -> None:
        self.model, self.prompt = model, prompt
        self.pixels = self.grid = None
        if prompt.images:
            assert model.config.vision is not None
            self.pixels, self.grid = image_inputs(list(prompt.images), model.config.vision)
        self.forwards = 0

    @torch.inference_mode()
    def __call__(self, seq: list[int]) -> tuple[np.ndarray, np.ndarray]:
        self.forwards += 1
        ids = torch.tensor([seq], dtype=torch.long)
        hidden = self.model(ids, pixel_values=self.pixels, grid_thw=self.grid, mode=AttentionMode.BLOCK,
                            block_size=self.model.config.diffusion.block_size)
        logits = self.model.logits(hidden)[0].float()
        logits[:, self.model.config.tokens.mask] = float("-inf")
        prob, top1 = logits.softmax(-1).max(-1)
        return top1.numpy(), prob.numpy()


def reference_block_decode(full: FullSequenceModel, prompt: Prompt, options: BlockOptions,
                           fills: list[int] | None = None) -> tuple[list[int], str]:
    """The decoded answer and stop reason; ``fills`` collects how many tokens each step filled."""
    size, sub_size, mask, end = options.block_size, options.sub_block_size, options.mask_id, options.end_id
    ids = prompt.token_ids.tolist()
    aligned = len(ids) // size * size
    committed = ids[:aligned]
    if aligned == len(ids):
        first = int(full(committed)[0][-1])
        if first == end:
            return [], "end"
        block, generated_from = [first] + [mask] * (size - 1), 0
    else:
        block, generated_from = ids[aligned:] + [mask] * (size - len(ids) + aligned), len(ids) - aligned
    out: list[int] = []
    while True:
        for sub in range(0, size, sub_size):
            while mask in block[sub: sub + sub_size]:
                top1, prob = full(committed + block)
                masked = [j for j in range(sub, sub + sub_size) if block[j] == mask]
                # Position j of the block is predicted at sequence index len(committed) + j - 1.
                conf = [float(prob[len(committed) + j - 1]) for j in masked]
                best = int(np.argmax(conf))
                chosen = [j for k, j in enumerate(masked) if conf[k] > options.threshold or k == best]
                for j in chosen:
                    block[j] = int(top1[len(committed) + j - 1])
                if fills is not None:
                    fills.append(len(chosen))
                new = block[generated_from:]
                if end in new and mask not in new[: new.index(end)]:
                    return (out + new[: new.index(end)])[: options.max_new_tokens], "end"
        out += block[generated_from:]
        if len(out) >= options.max_new_tokens:
            return out[: options.max_new_tokens], "max_new_tokens"
        first = int(full(committed + block)[0][-1])
        committed, block, generated_from = committed + block, [first] + [mask] * (size - 1), 0
        if first == end:
            return out, "end"


def _text_prompt(length: int, vocab: int = 700, seed: int = 0) -> Prompt:
    return Prompt(np.random.default_rng(seed).integers(30, vocab, length))


# (name, prompt length or "image", sub_block_size, threshold, max_new_tokens)
CASES = [
    ("aligned-sub8-one-per-step", 64, 8, 1.0, 40),
    ("unaligned-sub32-one-per-step", 45, 32, 1.0, 40),
    ("image-unaligned-sub8-one-per-step", "image", 8, 1.0, 36),
    ("short-prompt-sub8-one-per-step", 20, 8, 1.0, 20),
    ("aligned-sub8-threshold", 32, 8, 0.3, 64),
    ("unaligned-sub32-threshold", 50, 32, 0.3, 48),
]


@pytest.mark.parametrize(("name", "prompt_len", "sub_block_size", "threshold", "max_new_tokens"), CASES,
                         ids=[c[0] for c in CASES])
def test_block_threshold_equals_the_cache_free_reference(name: str, prompt_len: int | str, sub_block_size: int,
                                                         threshold: float, max_new_tokens: int) -> None:
    model, tokenizer = reference(1)
    prompt = image_prompt(tokenizer, seed=1) if prompt_len == "image" else _text_prompt(int(prompt_len))
    options = BlockOptions(tokenizer.special.mask, tokenizer.special.end, 32, sub_block_size, threshold,
                           max_new_tokens)
    full = FullSequenceModel(model, prompt)
    fills: list[int] = []
    expected, stop = reference_block_decode(full, prompt, options, fills)
    got = block_threshold(TorchBackend(model, 256), prompt, options)
    assert got.tokens[0].tolist() == expected
    assert got.stop == stop
    # The same steps and commits; the reference skips the prefill of a partial prompt's full blocks.
    p = len(prompt)
    assert got.forwards == full.forwards + int(0 < p // 32 * 32 < p)
    assert len(expected) > 0 and tokenizer.special.mask not in expected
    # threshold >= 1: exactly one token per step; below, some step fills several.
    assert (max(fills) == 1) == (threshold >= 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_block_threshold_equals_the_reference_on_a_text_only_model(seed: int) -> None:
    model = text_model(seed)
    prompt = _text_prompt(11, vocab=56, seed=seed)
    options = BlockOptions(TEXT_MASK, TEXT_END, 8, 4, 0.6, max_new_tokens=30)
    full = FullSequenceModel(model, prompt)
    expected, stop = reference_block_decode(full, prompt, options)
    got = block_threshold(TorchBackend(model, 128), prompt, options)
    assert (got.tokens[0].tolist(), got.stop, got.forwards) == (expected, stop, full.forwards + 1)


@pytest.mark.parametrize("prompt_len", [45, 64])
def test_sub_block_cache_fills_everything_with_fewer_forwarded_tokens(prompt_len: int) -> None:
    model, tokenizer = reference(2)
    prompt = _text_prompt(prompt_len, seed=2)
    runs: dict[bool, tuple[Decoded, SpyBackend]] = {}
    for cached in (False, True):
        spy = SpyBackend(TorchBackend(model, 256))
        # No end id, so both runs stop at max_new_tokens and take the same steps.
        options = BlockOptions(tokenizer.special.mask, -1, 32, 8, 1.0, max_new_tokens=50, sub_block_cache=cached)
        runs[cached] = block_threshold(spy, prompt, options), spy
    (plain, plain_spy), (cached_run, cached_spy) = runs[False], runs[True]
    assert cached_run.stop == "max_new_tokens" and cached_run.tokens.shape == (1, 50)
    assert tokenizer.special.mask not in cached_run.tokens
    # One token per step either way, so the same steps; the cached ones forward fewer tokens.
    assert cached_run.forwards == plain.forwards
    assert cached_spy.forwarded_tokens < plain_spy.forwarded_tokens
    assert cached_run.forwards == len(cached_spy.forwards())


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="must divide"):
        BlockOptions(3, 2, block_size=32, sub_block_size=12)
    with pytest.raises(ValueError, match="max_new_tokens"):
        BlockOptions(3, 2, max_new_tokens=0)
    with pytest.raises(ValueError, match="commit_mode"):
        BlockOptions(3, 2, commit_mode=AttentionMode.BLOCK)


# Scripted backend: block 8, sub-blocks of 4; the prediction at slot s is script[s + 1].
ANSWER = list(range(20, 40))


def _scripted(prompt_ids: list[int], answer: list[int], confidence: dict[int, float] | None = None,
              ) -> tuple[ScriptedBackend, Prompt]:
    script = prompt_ids + answer
    conf = [0.5] * len(script)
    for k, c in (confidence or {}).items():
        conf[len(prompt_ids) + k] = c
    return ScriptedBackend(script, conf, end_id=TEXT_END), Prompt(np.array(prompt_ids))


def _options(max_new_tokens: int = 100, threshold: float = 0.9) -> BlockOptions:
    return BlockOptions(TEXT_MASK, TEXT_END, 8, 4, threshold, max_new_tokens)


PROMPT8 = list(range(1, 9))


def test_end_filled_early_waits_for_the_positions_before_it() -> None:
    # The end token (answer index 13, block-2 position 5) is the most confident of its sub-block,
    # so it is filled while position 4 is still masked: decoding goes on one more step.
    answer = [*ANSWER[:13], TEXT_END, *ANSWER[13:]]
    backend, prompt = _scripted(PROMPT8, answer, {13: 0.8})
    spy = SpyBackend(backend)
    got = block_threshold(spy, prompt, _options())
    assert got.stop == "end" and got.tokens[0].tolist() == answer[:13]
    assert got.forwards == 1 + 7 + 1 + 3 + 2  # prefill, block 1, commit, block 2 up to the end
    assert got.forwards == len(spy.forwards())


def test_max_new_tokens_cuts_inside_a_block() -> None:
    backend, prompt = _scripted(PROMPT8, ANSWER)
    got = block_threshold(backend, prompt, _options(max_new_tokens=10))
    assert got.stop == "max_new_tokens" and got.tokens[0].tolist() == ANSWER[:10]
    assert got.forwards == 1 + 7 + 1 + 7  # the second block is finished, never committed


def test_max_new_tokens_at_a_block_boundary_skips_the_commit() -> None:
    backend, prompt = _scripted(PROMPT8, ANSWER)
    got = block_threshold(backend, prompt, _options(max_new_tokens=8))
    assert got.stop == "max_new_tokens" and got.tokens[0].tolist() == ANSWER[:8]
    assert got.forwards == 1 + 7
    assert backend.length == 8  # denoising steps never wrote KV


def test_end_predicted_by_a_commit_stops_without_another_block() -> None:
    answer = [*ANSWER[:8], TEXT_END, *ANSWER[8:]]
    backend, prompt = _scripted(PROMPT8, answer)
    got = block_threshold(backend, prompt, _options())
    assert got.stop == "end" and got.tokens[0].tolist() == ANSWER[:8]
    assert got.forwards == 1 + 7 + 1
    assert backend.written[0, 8:16].tolist() == ANSWER[:8]


def test_end_as_first_prediction_after_an_aligned_prompt() -> None:
    backend, prompt = _scripted(PROMPT8, [TEXT_END, *ANSWER])
    got = block_threshold(backend, prompt, _options())
    assert got.stop == "end" and got.tokens.shape == (1, 0)
    assert got.forwards == 1


def test_prompt_inside_the_first_block_needs_no_prefill_forward() -> None:
    backend, prompt = _scripted([1, 2, 3, 4, 5], ANSWER)
    spy = SpyBackend(backend)
    got = block_threshold(spy, prompt, _options(max_new_tokens=3))
    assert got.tokens[0].tolist() == ANSWER[:3] and got.stop == "max_new_tokens"
    assert (got.forwards, got.prefill_forwards) == (3, 0)
    assert spy.calls[0].kind == "prefill" and spy.calls[0].tokens == 0
    assert all(c.start == 0 and c.tokens == 8 for c in spy.forwards("step"))


def test_an_end_token_inside_the_prompt_is_not_a_stop() -> None:
    prompt_ids = [1, 2, 3, 4, TEXT_END, 6, 7, 8, 9, 10, 11]  # the end id sits in the prompt's partial block
    backend, prompt = _scripted(prompt_ids, ANSWER)
    got = block_threshold(backend, prompt, _options(max_new_tokens=5))
    assert got.stop == "max_new_tokens" and got.tokens[0].tolist() == ANSWER[:5]


def test_confident_positions_fill_together() -> None:
    # Block 1 positions 1..7 have confidences 0.95 0.95 0.2 | 0.3 0.95 0.95 0.95 (threshold 0.9):
    # two steps per sub-block.
    conf = {1: 0.95, 2: 0.95, 3: 0.2, 4: 0.3, 5: 0.95, 6: 0.95, 7: 0.95}
    backend, prompt = _scripted(PROMPT8, ANSWER, conf)
    spy = SpyBackend(backend)
    got = block_threshold(spy, prompt, _options(max_new_tokens=8))
    assert got.tokens[0].tolist() == ANSWER[:8]
    assert got.forwards == 1 + 2 + 2
    assert all(c.mode is AttentionMode.BIDIRECTIONAL and not c.write_kv for c in spy.forwards("step"))
