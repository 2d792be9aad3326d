"""The static KV cache as DecoderLM uses it: chunked prefill, read-only steps, capacity, batch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from blockpilot.vla.config import LMConfig
from blockpilot.vla.kv_cache import CacheCapacityError, KVCache
from blockpilot.vla.lm import DecoderLM
from blockpilot.vla.modes import AttentionMode

MakeLM = Callable[..., DecoderLM]
ATOL = 1e-5


def ids_for(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_in_chunks(model: DecoderLM, ids: torch.Tensor, chunks: list[int], mode: AttentionMode,
                      block_size: int | None, capacity: int = 32) -> tuple[torch.Tensor, KVCache]:
    cache = model.new_cache(capacity, batch=ids.shape[0])
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(ids[:, start:start + n], cache=cache, start=start, mode=mode, block_size=block_size))
            start += n
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize(("mode", "block_size", "chunks"), [
    (AttentionMode.CAUSAL, None, [3, 5, 1, 4, 2]),
    (AttentionMode.CAUSAL, None, [1] * 15),
    (AttentionMode.BLOCK, 4, [4, 8, 3]),  # block-aligned chunk starts; the last chunk is a partial block
    (AttentionMode.BLOCK, 5, [5, 5, 5]),
    (AttentionMode.BLOCK, 3, [3] * 5),
])
def test_chunked_prefill_equals_one_forward(tiny_lm: MakeLM, mode: AttentionMode, block_size: int | None,
                                            chunks: list[int]) -> None:
    model = tiny_lm(num_kv_heads=2)
    ids = ids_for(2, sum(chunks))
    chunked, chunked_cache = prefill_in_chunks(model, ids, chunks, mode, block_size)
    whole, whole_cache = prefill_in_chunks(model, ids, [sum(chunks)], mode, block_size)
    with torch.no_grad():
        uncached = model(ids, mode=mode, block_size=block_size)
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(whole, uncached, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked_cache.k, whole_cache.k, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked_cache.v, whole_cache.v, atol=ATOL, rtol=0)
    # Nothing is written past the prefilled slots.
    assert not chunked_cache.k[:, :, :, sum(chunks):].any() and not chunked_cache.v[:, :, :, sum(chunks):].any()


@pytest.mark.parametrize("mode", list(AttentionMode))
def test_read_only_step_leaves_cache_bit_identical(tiny_lm: MakeLM, mode: AttentionMode) -> None:
    model = tiny_lm()
    ids = ids_for(1, 12)
    _, cache = prefill_in_chunks(model, ids[:, :8], [8], AttentionMode.BLOCK, 4, capacity=16)
    k_before, v_before = cache.k.clone(), cache.v.clone()
    with torch.no_grad():
        first = model(ids[:, 8:], cache=cache, start=8, mode=mode, block_size=4, write_kv=False)
        again = model(ids[:, 8:], cache=cache, start=8, mode=mode, block_size=4, write_kv=False)
    assert torch.equal(cache.k, k_before) and torch.equal(cache.v, v_before)
    assert torch.equal(first, again)


def test_read_only_step_may_reach_past_capacity(tiny_lm: MakeLM) -> None:
    # A denoising window is never stored, so only the cached prefix has to fit.
    model = tiny_lm()
    cache = model.new_cache(capacity=8)
    with torch.no_grad():
        model(ids_for(1, 8), cache=cache)
        out = model(ids_for(1, 4), cache=cache, start=8, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    assert out.shape == (1, 4, 32)


@pytest.mark.parametrize(("start", "length", "write_kv"), [(0, 9, True), (5, 4, True), (8, 1, True),
                                                          (-1, 2, True), (9, 1, False)])
def test_capacity_overflow_raises_before_anything_is_written(tiny_lm: MakeLM, start: int, length: int,
                                                             write_kv: bool) -> None:
    model = tiny_lm()
    cache = model.new_cache(capacity=8)
    with pytest.raises(CacheCapacityError, match="capacity 8"), torch.no_grad():
        model(ids_for(1, length), cache=cache, start=start, write_kv=write_kv)
    assert not cache.k.any() and not cache.v.any()


def test_batch_mismatch_raises(tiny_lm: MakeLM) -> None:
    model = tiny_lm()
    cache = model.new_cache(capacity=8, batch=2)
    with pytest.raises(ValueError, match="batch 2"), torch.no_grad():
        model(ids_for(1, 3), cache=cache)
    assert not cache.k.any()


def test_forked_cache_rows_decode_independently(tiny_lm: MakeLM) -> None:
    """One prefix prefilled at batch 1, copied into a batch-3 cache, three different windows on top:
    each row equals the same window decoded alone on the batch-1 cache."""
    model = tiny_lm()
    prefix, block = ids_for(1, 8), 4
    single = model.new_cache(capacity=16)
    with torch.no_grad():
        model(prefix, cache=single, mode=AttentionMode.BLOCK, block_size=block)
    forked = model.new_cache(capacity=16, batch=3)
    forked.k.copy_(single.k.expand_as(forked.k))
    forked.v.copy_(single.v.expand_as(forked.v))
    windows = ids_for(3, 4, seed=11)
    with torch.no_grad():
        together = model(windows, cache=forked, start=8, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
        # Commit the rows: each row writes its own K/V and only its own.
        model(windows, cache=forked, start=8, mode=AttentionMode.BLOCK, block_size=block)
        for row in range(3):
            alone = model(windows[row:row + 1], cache=single, start=8, mode=AttentionMode.BIDIRECTIONAL,
                          write_kv=False)
            torch.testing.assert_close(together[row:row + 1], alone, atol=ATOL, rtol=0)
            one = model.new_cache(capacity=16)
            one.k.copy_(single.k)
            one.v.copy_(single.v)
            model(windows[row:row + 1], cache=one, start=8, mode=AttentionMode.BLOCK, block_size=block)
            torch.testing.assert_close(forked.k[:, row:row + 1], one.k, atol=ATOL, rtol=0)
            torch.testing.assert_close(forked.v[:, row:row + 1], one.v, atol=ATOL, rtol=0)


def test_cache_shapes_and_validation() -> None:
    config = LMConfig(vocab_size=16, hidden_size=32, intermediate_size=8, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=6)
    cache = KVCache(config, capacity=10, batch=2, dtype=torch.float16)
    assert cache.k.shape == cache.v.shape == (3, 2, 2, 10, 6)
    assert cache.k.dtype == torch.float16 and (cache.capacity, cache.batch) == (10, 2)
    cache.check_room(0, 10)
    cache.check_room(10, 0)
    with pytest.raises(CacheCapacityError, match="slot 4 exceeds capacity 10"):
        cache.check_room(4, 7)
    for capacity, batch in [(0, 1), (4, 0)]:
        with pytest.raises(ValueError, match="positive"):
            KVCache(config, capacity=capacity, batch=batch)


def test_new_cache_follows_model_dtype(tiny_lm: MakeLM) -> None:
    model = tiny_lm().to(torch.bfloat16)
    cache = model.new_cache(capacity=8)
    with torch.no_grad():
        out = model(ids_for(1, 5), cache=cache)
    assert cache.k.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert cache.k[:, :, :, :5].abs().sum() > 0


def test_forward_argument_checks(tiny_lm: MakeLM) -> None:
    model = tiny_lm()
    ids = ids_for(1, 4)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="block_size"):
        model(ids, mode=AttentionMode.BLOCK)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4))
