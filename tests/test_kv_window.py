"""The window KV I/O of ``lm_step`` (:mod:`blockpilot.runtime.kv_window`): the graph returns only the window's
K/V, the ONNX Runtime backend keeps one cache bound in place and writes the rows, the answers stay token for token
those of the whole-cache I/O, exports of the whole-cache I/O still run, and the per-step byte counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.formats.onnx_spec import KV_OUTPUTS, kv_io, load_spec
from blockpilot.runtime.backend import Prompt
from blockpilot.runtime.kv_window import slot_bytes, step_traffic, write_rows
from blockpilot.runtime.ort_backend import OrtBackend, ort_planner
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.vla.modes import AttentionMode

pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.is_dir(), reason="the shipped reference model is missing")
CAPACITY = 512


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockpilot.export import export_onnx
    from blockpilot.vla.loader import load_model

    model = load_model(SHIPPED_MODEL)
    out = {}
    for io in ("window", "full"):
        out[io] = tmp_path_factory.mktemp(io)
        export_onnx(model, out[io], CAPACITY, kv_io=io)
    return out


def test_the_window_graph_returns_only_the_windows_kv(exports: dict[str, Path]) -> None:
    import onnx

    spec = load_spec(exports["window"])
    assert spec["kv_io"] == "window" and kv_io(spec) == "window" and kv_io(load_spec(exports["full"])) == "full"
    cache = next(i["shape"] for i in spec["lm_step"]["inputs"] if i["name"] == "past_k")
    outputs = {o["name"]: o["shape"] for o in spec["lm_step"]["outputs"]}
    assert outputs["k_new"] == outputs["v_new"] == [*cache[:3], "T", cache[4]] and "present_k" not in outputs
    graph = onnx.load(str(exports["window"] / spec["lm_step"]["file"])).graph
    dims = [d.dim_param or d.dim_value for d in next(o for o in graph.output if o.name == "k_new").type.tensor_type
            .shape.dim]
    assert dims[:4] == [*cache[:3], "T"]  # the tracer leaves head_dim symbolic; ONNX Runtime returns it fixed
    with pytest.raises(ValueError, match=r"neither the window K/V \('k_new', 'v_new'\) nor the whole cache"):
        kv_io({"lm_step": {"outputs": [{"name": "top1"}, {"name": "present_k"}]}})


def _run(backend: OrtBackend, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    backend.prefill(Prompt(rng.integers(10, 200, n)))
    out = []
    for start, t in ((n, 32), (n + 32, 32), (n + 64, 1)):
        block = rng.integers(10, 200, (1, t))
        out.append(backend.step(block, start, mode=AttentionMode.BIDIRECTIONAL, write_kv=False).top1)
        out.append(backend.step(block, start, mode=AttentionMode.CAUSAL, write_kv=True).top1)
    out.append(backend.step(block, n + 40, mode=AttentionMode.BLOCK, write_kv=True, kv_end=n + 65).top1)
    return out


def test_one_cache_bound_in_place_equals_the_whole_cache_io(exports: dict[str, Path]) -> None:
    window, full = OrtBackend(exports["window"]), OrtBackend(exports["full"])
    address, seen = window._k.ctypes.data, []
    window.feed_observer = lambda feeds: seen.append(feeds["past_k"].ctypes.data)
    got, want = _run(window, 100), _run(full, 100)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # The same cache, bit for bit, in the one array bound at construction (never replaced).
    np.testing.assert_array_equal(window._k, full._k)
    np.testing.assert_array_equal(window._v, full._v)
    assert window._k.ctypes.data == address and set(seen) == {address} and window.kv_io == "window"
    k_new = window.last_outputs["k_new"]  # the last step: a draft of one token
    assert k_new.shape == (*window._k.shape[:3], 1, window._k.shape[4]) and "present_k" not in window.last_outputs
    assert full.last_outputs["present_k"].shape == full._k.shape  # the old I/O: the whole cache every step


def test_a_draft_writes_nothing_and_a_commit_only_its_rows(exports: dict[str, Path]) -> None:
    backend = OrtBackend(exports["window"])
    backend.prefill(Prompt(np.arange(10, 60)))
    before = backend._k.copy()
    block = np.full((1, 8), 5, dtype=np.int64)
    backend.step(block, 50, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    np.testing.assert_array_equal(backend._k, before)
    backend.step(block, 50, mode=AttentionMode.CAUSAL, write_kv=True)
    changed = np.flatnonzero((backend._k != before).any(axis=(0, 1, 2, 4)))
    assert changed.tolist() == list(range(50, 58))
    np.testing.assert_array_equal(backend._k[:, :, :, 50:58], backend.last_outputs["k_new"])


@pytest.mark.parametrize("settings", [DecoderSettings(name="scaffold"), DecoderSettings(name="block"),
                                      DecoderSettings(name="block", sub_block_cache=True, sub_block_size=8)],
                         ids=["scaffold", "block", "block-sub-block-cache"])
def test_held_out_answers_are_token_for_token_those_of_the_whole_cache_io(exports: dict[str, Path],
                                                                          settings: DecoderSettings) -> None:
    frames = heldout_keyframes(1)[:3]
    plans = {io: [ort_planner(SHIPPED_MODEL, path, decoder=settings).plan(observation(f)) for f in frames]
             for io, path in exports.items()}
    for new, old in zip(plans["window"], plans["full"], strict=True):
        np.testing.assert_array_equal(new.tokens, old.tokens)
        assert new.text == old.text


def test_write_rows_checks_the_window() -> None:
    cache = np.zeros((2, 1, 2, 10, 4), np.float32)
    rows = np.ones((2, 1, 2, 3, 4), np.float32)
    write_rows(cache, rows, 7)
    assert cache[:, :, :, 7:].all() and not cache[:, :, :, :7].any()
    with pytest.raises(ValueError, match=r"window of 3 row\(s\) at slot 8 outside the cache's 10 slots"):
        write_rows(cache, rows, 8)
    with pytest.raises(ValueError, match=r"does not fit the cache"):
        write_rows(cache, np.ones((2, 1, 3, 3, 4), np.float32), 0)


def test_step_traffic_counts() -> None:
    # The number: the 1.5B shape (28 layers, 2 KV heads of 128) with 1,240 slots moves 142 MB per step.
    before = step_traffic("full", layers=28, kv_heads=2, head_dim=128, capacity=1240, t=32, key_end=347)
    assert before.moved == 2 * 1240 * slot_bytes(28, 2, 128, 4) == 142_213_120
    after = step_traffic("window", layers=28, kv_heads=2, head_dim=128, capacity=1240, t=32, key_end=347)
    assert after.moved == (347 + 32 + 32) * slot_bytes(28, 2, 128, 4) and after.copied_in == 0
    draft = step_traffic("window", layers=28, kv_heads=2, head_dim=128, capacity=8192, t=32, key_end=347,
                         commit=False)
    assert draft.moved == (347 + 32) * slot_bytes(28, 2, 128, 4)  # independent of the capacity
    with pytest.raises(ValueError, match=r"need 0 < t \(33\) <= key_end \(32\)"):
        step_traffic("window", layers=1, kv_heads=1, head_dim=1, capacity=64, t=33, key_end=32)
    assert KV_OUTPUTS["window"] == ("k_new", "v_new")
