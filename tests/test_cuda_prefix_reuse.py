"""FlashBlock-style prefix reuse in the CUDA backend's decode LM (``CudaBackend(prefix_reuse=True)``), on the CPU.

The split of a draft's attention at ``start`` and the merge of the two states are exact: the first draft at a
window, a repeat with the same tokens, and any draft after an invalidating call (a commit, truncate, another
start, a fork, a prefill) equal the plain forward. A later draft with other tokens reuses the earlier queries'
prefix part: an approximation whose effect on plans is measured here (reported, only sanity-asserted).
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_fixtures import assert_same_step, image_prompt

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.runtime.backend import StepResult
from blockpilot.runtime.cuda_backend import CudaBackend
from blockpilot.runtime.cuda_lm import PrefixStep
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.plans import DrivingSchema
from blockpilot.vla.schema_io import load_schema
from blockpilot.vla.tokenizer import Tokenizer

BID = AttentionMode.BIDIRECTIONAL


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(shipped: tuple[VLAModel, Tokenizer]) -> tuple[CudaBackend, CudaBackend]:
    model, tokenizer = shipped
    plain = CudaBackend(model, 256, device="cpu")
    reuse = CudaBackend(model, 256, device="cpu", prefix_reuse=True)
    prompt = image_prompt(tokenizer, text_tokens=20)
    assert_same_step(plain.prefill(prompt), reuse.prefill(prompt))
    return plain, reuse


def _both(plain: CudaBackend, reuse: CudaBackend, tokens: np.ndarray, start: int, mode: AttentionMode = BID,
          write_kv: bool = False) -> tuple[StepResult, StepResult]:
    return (plain.step(tokens, start, mode=mode, write_kv=write_kv),
            reuse.step(tokens, start, mode=mode, write_kv=write_kv))


@pytest.mark.parametrize("mode", [AttentionMode.BIDIRECTIONAL, AttentionMode.BLOCK])
def test_first_and_repeated_drafts_are_exact(shipped: tuple[VLAModel, Tokenizer], mode: AttentionMode) -> None:
    plain, reuse = _pair(shipped)
    rng = np.random.default_rng(0)
    vocab = plain.config.lm.vocab_size
    start = plain.length
    tokens = rng.integers(8, vocab - 8, (1, 12))
    assert_same_step(*_both(plain, reuse, tokens, start, mode))  # (1) the first draft: split + merge, same queries
    assert reuse._prefix_key is not None
    assert_same_step(*_both(plain, reuse, tokens, start, mode))  # (2) a repeat: reused prefix states, same queries
    assert plain.length == reuse.length == start


def test_reuse_with_other_tokens_changes_little_and_invalidation_is_exact(
        shipped: tuple[VLAModel, Tokenizer]) -> None:
    plain, reuse = _pair(shipped)
    rng = np.random.default_rng(1)
    vocab = plain.config.lm.vocab_size
    start = plain.length
    first, second = rng.integers(8, vocab - 8, (2, 1, 12))
    _both(plain, reuse, first, start)
    a, b = _both(plain, reuse, second, start)  # approximate: the prefix part keeps `first`'s queries
    assert a.top1.shape == b.top1.shape and np.isfinite(b.prob).all()
    # (3) invalidation: a commit, then a draft at the new start; a truncate; another start; a fork.
    assert_same_step(*_both(plain, reuse, first, start, write_kv=True))
    assert reuse._prefix_key is None
    start = plain.length
    assert_same_step(*_both(plain, reuse, second, start))
    _both(plain, reuse, first, start)  # same window, other tokens: reuse, approximate
    for x in (plain, reuse):
        x.truncate(start - 4)
    assert reuse._prefix_key is None
    assert_same_step(*_both(plain, reuse, second, start - 4))
    assert_same_step(*_both(plain, reuse, first, start - 6))  # another start: stores afresh
    assert_same_step(*_both(plain, reuse, first[:, :8], start - 6))  # another width: stores afresh
    assert_same_step(*_both(plain, reuse, second[:, :5], start - 6, mode=AttentionMode.CAUSAL))  # causal: never split
    assert reuse._prefix_key is None


def _plans(backend_model: tuple[VLAModel, Tokenizer], name: str, reuse: bool, keys: list) -> list:
    from blockpilot.eval.synthetic import observation

    model, tokenizer = backend_model
    settings, schema = DecoderSettings(name=name), load_schema(SHIPPED_MODEL)  # the checkpoint's answer schema
    assert isinstance(schema, DrivingSchema)
    capacity = Planner.from_model(model, tokenizer, decoder=settings, schema=schema).backend.capacity
    planner = Planner(CudaBackend(model, capacity, device="cpu", prefix_reuse=reuse), model.config, tokenizer,
                      decoder=settings, schema=schema)
    return [planner.plan(observation(key)) for key in keys]


def test_measured_effect_on_plans(shipped: tuple[VLAModel, Tokenizer]) -> None:
    """(4) Plans with reuse on vs off over held-out observations: printed, sanity-asserted only."""
    from blockpilot.eval.synthetic import heldout_keyframes

    keys = heldout_keyframes(2, stride=8)[:8]
    ar = _plans(shipped, "ar", False, keys)
    report = {}
    for name in ("block", "scaffold"):
        off, on = _plans(shipped, name, False, keys), _plans(shipped, name, True, keys)
        same = sum(np.array_equal(a.tokens, b.tokens) for a, b in zip(off, on, strict=True))
        report[name] = same
        if name == "scaffold":
            report["scaffold==ar (reuse off)"] = sum(np.array_equal(a.tokens, b.tokens)
                                                     for a, b in zip(off, ar, strict=True))
            report["scaffold==ar (reuse on)"] = sum(np.array_equal(a.tokens, b.tokens)
                                                    for a, b in zip(on, ar, strict=True))
        report[f"{name} errors off/on"] = (sum(p.error is not None for p in off), sum(p.error is not None for p in on))
        assert all(p.tokens.size > 0 for p in on)
    print(f"\nprefix reuse over {len(keys)} observations (identical plans / scaffold==ar counts): {report}")
    assert 0 <= report["scaffold==ar (reuse on)"] <= len(keys)


class _SplitNeverReuse(CudaBackend):
    """Splits every draft but stores afresh each time: the split + merge alone, in a whole plan."""

    def _prefix_step(self, *args: int | bool) -> PrefixStep | None:
        step = super()._prefix_step(*args)  # type: ignore[arg-type]
        if step is not None and step.reuse:
            self._prefix_key = None
            step = super()._prefix_step(*args)  # type: ignore[arg-type]
        return step


def test_split_without_reuse_leaves_block_plans_unchanged(shipped: tuple[VLAModel, Tokenizer]) -> None:
    from blockpilot.eval.synthetic import heldout_keyframes, observation

    model, tokenizer = shipped
    settings = DecoderSettings(name="block")
    ref = Planner.from_model(model, tokenizer, decoder=settings)
    ours = Planner(_SplitNeverReuse(model, ref.backend.capacity, device="cpu", prefix_reuse=True), model.config,
                   tokenizer, decoder=settings)
    for key in heldout_keyframes(1, stride=8)[:2]:
        a, b = ref.plan(observation(key)), ours.plan(observation(key))
        assert np.array_equal(a.tokens, b.tokens)
        assert a.stats.forwards == b.stats.forwards
