"""Decoders over the backend protocol: lossless speculation, seeded rollouts against a sequential
sampling reference, exact forward accounting, prefix sharing, and the AR stop conditions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from runtime_fixtures import (
    TEXT_END,
    TEXT_MASK,
    Call,
    ScriptedBackend,
    SpyBackend,
    image_prompt,
    nuscenes_scaffold,
    reference,
    text_model,
    toy_scaffold,
)

from blockpilot.runtime.backend import Backend, Prompt, Sampling, row_seeds
from blockpilot.runtime.decoders import (
    BlockOptions,
    Decoded,
    RolloutOptions,
    ScaffoldLike,
    SpeculativeOptions,
    ar_greedy,
    block_threshold,
    scaffold_speculative,
    section_blocks,
    shared_prefix_rollouts,
)
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.modes import AttentionMode

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = range(5)


def _reference_setup(seed: int, max_batch: int = 1) -> tuple[TorchBackend, Prompt, ScaffoldLike, int]:
    model, tokenizer = reference(seed)
    return TorchBackend(model, 512, max_batch), image_prompt(tokenizer, seed=seed), nuscenes_scaffold(), \
        tokenizer.special.mask


def _text_prompt(seed: int, n: int = 13) -> Prompt:
    return Prompt(np.random.default_rng(100 + seed).integers(0, 56, n))


def _check_scaffold_answer(tokens: np.ndarray, scaffold: ScaffoldLike, mask_id: int) -> None:
    frozen = scaffold.frozen
    assert tokens.shape[-1] == len(scaffold.token_ids)
    assert (tokens[..., frozen] == scaffold.token_ids[frozen]).all()
    assert not (tokens == mask_id).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_scaffold_speculative_equals_constrained_ar_greedy_with_an_image(seed: int) -> None:
    backend, prompt, scaffold, mask = _reference_setup(seed)
    expected = ar_greedy(backend, prompt, max_new_tokens=0, end_id=-1, scaffold=scaffold)
    _check_scaffold_answer(expected.tokens, scaffold, mask)
    for block_size in (8, 16, 32):
        for threshold in (0.0, 0.5):
            got = scaffold_speculative(backend, prompt, scaffold, SpeculativeOptions(mask, block_size, threshold))
            assert np.array_equal(got.tokens, expected.tokens), (block_size, threshold)
            assert got.stop == "scaffold"


@pytest.mark.parametrize("seed", range(3))
def test_scaffold_speculative_equals_constrained_ar_greedy_text_only(seed: int) -> None:
    backend = TorchBackend(text_model(seed), 128)
    prompt, scaffold = _text_prompt(seed), toy_scaffold(TEXT_MASK, seed)
    expected = ar_greedy(backend, prompt, max_new_tokens=0, end_id=TEXT_END, scaffold=scaffold)
    _check_scaffold_answer(expected.tokens, scaffold, TEXT_MASK)
    # The answer must depend on the model, or equality would say little.
    assert len(set(expected.tokens[0, ~scaffold.frozen].tolist())) > 5
    for block_size in (4, 8, 32):
        for threshold in (0.0, 0.5):
            got = scaffold_speculative(backend, prompt, scaffold, SpeculativeOptions(TEXT_MASK, block_size, threshold))
            assert np.array_equal(got.tokens, expected.tokens), (block_size, threshold)


def test_speculation_saves_forwards_over_ar() -> None:
    backend, prompt, scaffold, mask = _reference_setup(0)
    spec = scaffold_speculative(backend, prompt, scaffold, SpeculativeOptions(mask, 32, 0.0))
    # Long frozen runs are verified in one forward each.
    assert spec.forwards < len(scaffold.token_ids)
    assert spec.tokens_per_forward > 1.0


def _sequential_sampling_reference(backend: Backend, prompt: Prompt, scaffold: ScaffoldLike, fork_at: int,
                                   sampling: Sampling) -> np.ndarray:
    """One row at batch one, one token per causal forward: greedy before ``fork_at``, then each
    value token drawn with ``sampling`` (one seed) by the forward that predicts it."""
    template, frozen = scaffold.token_ids, scaffold.frozen
    n, p = len(template), len(prompt)
    pending = int(backend.prefill(prompt).top1[0, -1])
    out = np.empty(n, dtype=np.int64)
    for j in range(n):
        out[j] = template[j] if frozen[j] else pending
        if j + 1 < n:
            draw = sampling if j + 1 >= fork_at else None
            res = backend.step(out[None, j: j + 1], p + j, mode=AttentionMode.CAUSAL, write_kv=True, sampling=draw)
            assert (res.sampled is None) == (draw is None)
            pending = int(res.sampled[0, 0] if res.sampled is not None else res.top1[0, 0])
    return out


def _fork_at(scaffold: ScaffoldLike, key: str = "trajectory") -> int:
    return next(s.start for s in scaffold.sections if s.key == key)


@pytest.mark.parametrize(("case", "block_size", "threshold"),
                         [("reference-0", 32, 0.0), ("reference-1", 8, 0.5), ("text-0", 8, 0.0), ("text-1", 32, 0.5)])
def test_rollouts_equal_sequential_sampling_reference_per_row(case: str, block_size: int, threshold: float) -> None:
    kind, seed = case.split("-")
    rollouts, temperature, user_seed = 3, 0.8, 11 + int(seed)
    if kind == "reference":
        backend, prompt, scaffold, mask = _reference_setup(int(seed), max_batch=rollouts)
        single = TorchBackend(reference(int(seed))[0], 512)
    else:
        model = text_model(int(seed))
        backend, single = TorchBackend(model, 128, rollouts), TorchBackend(model, 128)
        prompt, scaffold, mask = _text_prompt(int(seed)), toy_scaffold(TEXT_MASK, int(seed)), TEXT_MASK
    options = RolloutOptions(SpeculativeOptions(mask, block_size, threshold), rollouts, temperature, user_seed)
    got = shared_prefix_rollouts(backend, prompt, scaffold, options)
    assert got.tokens.shape == (rollouts, len(scaffold.token_ids))
    fork_at = _fork_at(scaffold)
    for row, row_seed in enumerate(row_seeds(user_seed, rollouts)):
        expected = _sequential_sampling_reference(single, prompt, scaffold, fork_at,
                                                  Sampling(temperature, (row_seed,)))
        assert np.array_equal(got.tokens[row], expected), row
    # Sampling made a difference somewhere: rows are not all the greedy answer.
    greedy = ar_greedy(single, prompt, max_new_tokens=0, end_id=-1, scaffold=scaffold).tokens[0]
    assert np.array_equal(got.tokens[:, :fork_at], np.repeat(greedy[None, :fork_at], rollouts, 0))
    assert (got.tokens[:, fork_at:] != greedy[fork_at:]).any()


def test_rollouts_sample_the_first_token_of_the_forked_section_per_row() -> None:
    # In the toy scaffold the trajectory opens with a value slot: that token, too, is a draw
    # (predicted by the last prefix position), not the greedy token shared by every row.
    model = text_model(0)
    scaffold, fork_at = toy_scaffold(TEXT_MASK, 0), _fork_at(toy_scaffold(TEXT_MASK, 0))
    assert not scaffold.frozen[fork_at]
    firsts = set()
    p = len(_text_prompt(0))
    for user_seed in range(6):
        options = RolloutOptions(SpeculativeOptions(TEXT_MASK, 8), 4, temperature=2.0, seed=user_seed)
        spy = SpyBackend(TorchBackend(model, 128, 4))
        decoded = shared_prefix_rollouts(spy, _text_prompt(0), scaffold, options)
        firsts |= set(decoded.tokens[:, fork_at].tolist())
        _check_counts(decoded, spy)
        # That draw costs one single-token forward in every row, right after the fork.
        fork_index = next(i for i, c in enumerate(spy.calls) if c.kind == "fork")
        redraw = spy.calls[fork_index + 2]
        assert spy.calls[fork_index + 1] == Call("truncate", start=p + fork_at - 1)
        seeds = tuple(row_seeds(user_seed, 4))
        assert (redraw.batch, redraw.start, redraw.tokens) == (4, p + fork_at - 1, 1)
        assert redraw.sampling == Sampling(2.0, seeds)
    assert len(firsts) > 1


def _check_counts(decoded: Decoded, spy: SpyBackend) -> None:
    forwards = spy.forwards()
    assert decoded.forwards == len(forwards)
    assert decoded.row_forwards == sum(c.batch for c in forwards)
    assert decoded.prefill_forwards == len(spy.forwards("prefill"))
    assert decoded.decode_forwards == len(spy.forwards("step"))


DECODER_CASES: dict[str, Any] = {
    "ar": lambda b, p, s, m: ar_greedy(b, p, max_new_tokens=20, end_id=-1),
    "ar-scaffold": lambda b, p, s, m: ar_greedy(b, p, max_new_tokens=0, end_id=-1, scaffold=s),
    "speculative": lambda b, p, s, m: scaffold_speculative(b, p, s, SpeculativeOptions(m, 16, 0.5)),
    "rollouts": lambda b, p, s, m: shared_prefix_rollouts(b, p, s, RolloutOptions(SpeculativeOptions(m), 3)),
    "block": lambda b, p, s, m: block_threshold(b, p, BlockOptions(m, end_id=-1, max_new_tokens=40)),
    "block-sub-cache": lambda b, p, s, m: block_threshold(
        b, p, BlockOptions(m, end_id=-1, max_new_tokens=40, sub_block_cache=True)),
    "block-causal-commit": lambda b, p, s, m: block_threshold(
        b, p, BlockOptions(m, end_id=-1, max_new_tokens=40, commit_mode=AttentionMode.CAUSAL)),
}


@pytest.mark.parametrize("name", list(DECODER_CASES))
def test_reported_forwards_equal_real_backend_calls(name: str) -> None:
    backend, prompt, scaffold, mask = _reference_setup(0, max_batch=3)
    spy = SpyBackend(backend)
    decoded = DECODER_CASES[name](spy, prompt, scaffold, mask)
    _check_counts(decoded, spy)
    assert decoded.prefill_forwards == 1
    if name == "ar-scaffold":
        assert decoded.forwards == len(scaffold.token_ids)
    if name == "ar":
        assert decoded.stop == "max_new_tokens" and decoded.forwards == decoded.tokens.shape[1] == 20


def test_block_threshold_counts_with_a_prompt_shorter_than_a_block() -> None:
    # Nothing to prefill (the prompt sits inside the first block): a reset, not a forward.
    spy = SpyBackend(TorchBackend(text_model(0), 64))
    decoded = block_threshold(spy, _text_prompt(0, 5), BlockOptions(TEXT_MASK, -1, 8, 4, 0.9, max_new_tokens=12))
    assert spy.calls[0].kind == "prefill" and not spy.calls[0].forwarded
    _check_counts(decoded, spy)
    assert decoded.prefill_forwards == 0
    assert decoded.tokens.shape == (1, 12)


def test_rollouts_prefill_once_share_the_prefix_and_fork_for_the_trajectory() -> None:
    backend, prompt, scaffold, mask = _reference_setup(1, max_batch=4)
    spy = SpyBackend(backend)
    n, fork_at = 4, _fork_at(scaffold)
    decoded = shared_prefix_rollouts(spy, prompt, scaffold, RolloutOptions(SpeculativeOptions(mask), n, 0.7, 5))
    assert len(spy.forwards("prefill")) == 1
    assert [c.kind for c in spy.calls].count("fork") == 1
    fork_index = next(i for i, c in enumerate(spy.calls) if c.kind == "fork")
    before, after = spy.calls[:fork_index], spy.calls[fork_index + 1:]
    prefix = [c for c in before if c.forwarded]
    trajectory = [c for c in after if c.forwarded]
    assert all(c.batch == 1 for c in prefix) and all(c.batch == n for c in trajectory)
    assert trajectory and all(c.kind == "step" for c in trajectory)
    # The prefix covers the answer before the trajectory, the forked steps only the trajectory.
    p = len(prompt)
    assert all(c.start < p + fork_at for c in prefix if c.kind == "step")
    assert all(c.start >= p + fork_at - 1 for c in trajectory)
    assert all(c.sampling is None for c in prefix)
    # Drafts propose greedily; every causal verify in the forked rows draws with the row seeds.
    assert all((c.sampling is not None) == (c.mode is AttentionMode.CAUSAL) for c in trajectory)
    assert decoded.row_forwards == len(prefix) + n * len(trajectory)
    _check_counts(decoded, spy)

    assert (decoded.tokens[:, :fork_at] == decoded.tokens[0, :fork_at]).all()
    greedy = scaffold_speculative(backend, prompt, scaffold, SpeculativeOptions(mask))
    assert np.array_equal(decoded.tokens[0, :fork_at], greedy.tokens[0, :fork_at])
    _check_scaffold_answer(decoded.tokens, scaffold, mask)
    assert len({tuple(row) for row in decoded.tokens[:, fork_at:].tolist()}) > 1


def test_rollouts_reproduce_with_one_seed_and_differ_across_seeds() -> None:
    backend, prompt, scaffold, mask = _reference_setup(2, max_batch=2)

    def run(seed: int) -> np.ndarray:
        options = RolloutOptions(SpeculativeOptions(mask, 16, 0.5), 2, temperature=0.7, seed=seed)
        return shared_prefix_rollouts(backend, prompt, scaffold, options).tokens

    first = run(3)
    assert np.array_equal(run(3), first)
    assert not np.array_equal(run(4), first)


def test_rollouts_reject_an_unknown_fork_section() -> None:
    backend, prompt, scaffold, mask = _reference_setup(0, max_batch=2)
    with pytest.raises(ValueError, match="no section 'route'"):
        shared_prefix_rollouts(backend, prompt, scaffold, RolloutOptions(SpeculativeOptions(mask), 2,
                                                                          fork_section="route"))


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="block_size"):
        SpeculativeOptions(3, block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        SpeculativeOptions(3, threshold=1.5)
    with pytest.raises(ValueError, match="rollouts"):
        RolloutOptions(SpeculativeOptions(3), rollouts=0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutOptions(SpeculativeOptions(3), temperature=0.0)


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_section_blocks_tile_the_range_without_crossing_sections(block_size: int) -> None:
    scaffold = toy_scaffold(TEXT_MASK)
    for begin, end in [(0, len(scaffold.token_ids)), (5, 60), (_fork_at(scaffold), len(scaffold.token_ids))]:
        blocks = list(section_blocks(scaffold, begin, end, block_size))
        assert [a for a, _ in blocks] == [begin, *[b for _, b in blocks[:-1]]]
        assert blocks[-1][1] == end
        for a, b in blocks:
            assert 0 < b - a <= block_size
            assert any(s.start <= a and b <= s.end for s in scaffold.sections)


ANSWER = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]


def _scripted(prompt_len: int, answer: list[int]) -> tuple[ScriptedBackend, Prompt]:
    prompt = Prompt(np.arange(1, prompt_len + 1))
    return ScriptedBackend([*prompt.token_ids.tolist(), *answer], end_id=TEXT_END), prompt


def test_ar_greedy_stops_at_the_end_token() -> None:
    backend, prompt = _scripted(6, [*ANSWER[:4], TEXT_END, *ANSWER[4:]])
    decoded = ar_greedy(backend, prompt, max_new_tokens=50, end_id=TEXT_END)
    assert decoded.stop == "end"
    assert decoded.tokens.tolist() == [ANSWER[:4]]
    assert decoded.forwards == 5  # the prefill and one step per kept token
    assert backend.written[0, 6:10].tolist() == ANSWER[:4]


def test_ar_greedy_stops_at_max_new_tokens() -> None:
    backend, prompt = _scripted(6, ANSWER)
    decoded = ar_greedy(backend, prompt, max_new_tokens=3, end_id=TEXT_END)
    assert decoded.stop == "max_new_tokens"
    assert decoded.tokens.tolist() == [ANSWER[:3]]
    assert decoded.forwards == 3


def test_ar_greedy_end_as_first_prediction_gives_an_empty_answer() -> None:
    backend, prompt = _scripted(6, [TEXT_END, *ANSWER])
    decoded = ar_greedy(backend, prompt, max_new_tokens=5, end_id=TEXT_END)
    assert decoded.stop == "end" and decoded.tokens.shape == (1, 0) and decoded.forwards == 1
    assert decoded.tokens_per_forward == 0.0


def test_constrained_ar_greedy_ignores_the_end_token_and_fills_the_scaffold() -> None:
    scaffold = toy_scaffold(TEXT_MASK)
    n = len(scaffold.token_ids)
    backend, prompt = _scripted(6, [TEXT_END] * n)
    decoded = ar_greedy(backend, prompt, max_new_tokens=1, end_id=TEXT_END, scaffold=scaffold)
    assert decoded.stop == "scaffold" and decoded.forwards == n
    expected = np.where(scaffold.frozen, scaffold.token_ids, TEXT_END)
    assert np.array_equal(decoded.tokens[0], expected)
