"""attention_mask against masks spelled out slot by slot."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockpilot.vla.masks import attention_mask
from blockpilot.vla.modes import AttentionMode


def reference(q_slots: list[int], k_slots: list[int], mode: AttentionMode, block_size: int | None) -> torch.Tensor:
    rows = []
    for q in q_slots:
        row = []
        for k in k_slots:
            if mode is AttentionMode.CAUSAL:
                allowed = k <= q
            elif mode is AttentionMode.BIDIRECTIONAL:
                allowed = True
            else:
                assert block_size is not None
                # k's block starts no later than q's block.
                q_block_start = q - q % block_size
                allowed = k < q_block_start + block_size
            row.append(allowed)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(q_slots), len(k_slots))


def check(q_slots: list[int], k_slots: list[int], mode: AttentionMode, block_size: int | None) -> None:
    got = attention_mask(torch.tensor(q_slots, dtype=torch.long), torch.tensor(k_slots, dtype=torch.long),
                         mode, block_size)
    assert got.dtype == torch.bool
    assert got.shape == (len(q_slots), len(k_slots))
    assert torch.equal(got, reference(q_slots, k_slots, mode, block_size))


@pytest.mark.parametrize("mode", list(AttentionMode))
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 8, 32])
@pytest.mark.parametrize(("start", "length"), [(0, 1), (0, 12), (3, 5), (6, 7), (8, 4), (31, 2), (40, 9)])
def test_window_against_cached_prefix(mode: AttentionMode, block_size: int, start: int, length: int) -> None:
    # The shape a cached forward uses: a window at start.. sees slots 0..start+length-1.
    check(list(range(start, start + length)), list(range(start + length)), mode, block_size)


@pytest.mark.parametrize("mode", list(AttentionMode))
def test_window_without_prefix_starting_mid_block(mode: AttentionMode) -> None:
    # No cache: the keys are the window itself, at slots that do not begin at 0 or on a block edge.
    slots = list(range(5, 14))
    check(slots, slots, mode, 4)


@settings(max_examples=150, deadline=None)
@given(
    q=st.lists(st.integers(0, 70), min_size=1, max_size=12),
    k=st.lists(st.integers(0, 70), min_size=1, max_size=12),
    mode=st.sampled_from(list(AttentionMode)),
    block_size=st.integers(1, 20),
)
def test_arbitrary_slot_sets(q: list[int], k: list[int], mode: AttentionMode, block_size: int) -> None:
    check(q, k, mode, block_size)


def test_block_size_one_is_causal_and_huge_block_sees_everything() -> None:
    slots = torch.arange(0, 10)
    causal = attention_mask(slots, slots, AttentionMode.CAUSAL)
    assert torch.equal(attention_mask(slots, slots, AttentionMode.BLOCK, 1), causal)
    assert bool(attention_mask(slots, slots, AttentionMode.BLOCK, 10).all())
    # Within one block every query sees every key of that block, and nothing of later blocks.
    block = attention_mask(slots, slots, AttentionMode.BLOCK, 4)
    assert bool(block[4:8, 4:8].all()) and not bool(block[:8, 8:].any())
    assert bool((block | ~causal).all()), "BLOCK must allow everything CAUSAL allows"


@pytest.mark.parametrize("block_size", [None, 0, -2])
def test_block_mode_needs_positive_block_size(block_size: int | None) -> None:
    slots = torch.arange(4)
    with pytest.raises(ValueError, match="block_size"):
        attention_mask(slots, slots, AttentionMode.BLOCK, block_size)


def test_unknown_mode_is_rejected() -> None:
    slots = torch.arange(4)
    with pytest.raises(ValueError, match="unknown attention mode"):
        attention_mask(slots, slots, "sideways")  # type: ignore[arg-type]


def test_attention_modes_carry_their_graph_ids() -> None:
    """One table of mode ids (the graph format): the export records it, every backend and kernel reads ``.id``."""
    assert AttentionMode.ids() == {"causal": 0, "block": 1, "bidirectional": 2}
    assert [AttentionMode.from_id(i) for i in range(3)] == list(AttentionMode)
    assert AttentionMode("block") is AttentionMode.BLOCK and AttentionMode.BLOCK == "block"
    with pytest.raises(ValueError, match="mode must be one of"):
        AttentionMode.from_id(3)
