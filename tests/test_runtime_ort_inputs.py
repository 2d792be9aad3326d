"""The host side shared by the ONNX Runtime and TensorRT backends (:mod:`blockpilot.runtime.graph_backend`) and
the ONNX Runtime backend's public feed hook, over a real export of the shipped model (torch-free at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export import export_onnx
from blockpilot.formats.onnx_spec import load_spec
from blockpilot.runtime.backend import CacheFullError, Prompt, PromptError
from blockpilot.runtime.graph_backend import GraphInputs
from blockpilot.runtime.ort_backend import OrtBackend, ort_planner
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.rope_index import continuation_positions

CAPACITY = 384
LM_INPUTS = {"inputs_embeds", "position_ids", "start", "key_end", "mode", "past_k", "past_v"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.vla.loader import load_model

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(load_model(SHIPPED_MODEL), out, CAPACITY)
    return out


@pytest.fixture(scope="module")
def prompt(exported: Path) -> Prompt:
    planner = ort_planner(SHIPPED_MODEL, exported, decoder=DecoderSettings(name="scaffold"))
    return planner.prompt(observation(heldout_keyframes(1)[0]))[0]


def _never(*_: Any) -> Any:
    raise AssertionError("no forward expected")


def test_feed_observer_sees_every_lm_run_as_fed(exported: Path, prompt: Prompt) -> None:
    backend = OrtBackend(exported)
    seen: list[dict[str, np.ndarray]] = []
    backend.feed_observer = lambda feeds: seen.append({k: np.array(v, copy=True) for k, v in feeds.items()})
    n = len(prompt)
    backend.prefill(prompt)
    block = np.full((1, 32), 5, dtype=np.int64)
    backend.step(block, n, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    backend.step(block, n, mode=AttentionMode.CAUSAL, write_kv=True)
    assert [set(f) for f in seen] == [LM_INPUTS] * 3
    prefill, draft, commit = seen
    assert prefill["inputs_embeds"].shape == (1, n, backend.spec["hidden_size"])
    assert (int(prefill["start"]), int(prefill["key_end"])) == (0, n) and not prefill["past_k"].any()
    assert [(int(f["start"]), int(f["key_end"]), int(f["mode"])) for f in (draft, commit)] == [(n, n + 32, 2),
                                                                                            (n, n + 32, 0)]
    assert draft["past_k"][:, :, :, :n].any() and not draft["past_k"][:, :, :, n:].any()
    np.testing.assert_array_equal(draft["past_k"], commit["past_k"])  # the draft left the cache as it was
    backend.feed_observer = None
    backend.step(block, n + 32, mode=AttentionMode.CAUSAL, write_kv=False)
    assert len(seen) == 3 and backend.length == n + 32


@pytest.mark.parametrize(("vision", "missing"), [
    ("graph", "the export has no vision graph"), ("engine", "the bundle has no vision engine")])
def test_prompt_errors_keep_each_backends_words(exported: Path, prompt: Prompt, vision: str, missing: str) -> None:
    inputs = GraphInputs(load_spec(exported), exported, vision=vision)
    n, features = len(prompt), np.zeros((16, inputs.hidden), np.float32)
    with pytest.raises(PromptError, match=f"the prompt has images but {missing}"):
        inputs.prefill(prompt, n, None, _never)
    # A frame of another size is resized by the export's image policy, never refused for its size.
    big = np.zeros((224, 224, 3), dtype=np.uint8)
    grids: list[tuple[int, int, int]] = []
    inputs.prefill(Prompt(prompt.token_ids, (big,)), n, lambda p, g: grids.append(g) or features,
                   lambda e, pos: (np.zeros((1, len(e)), np.int64), np.zeros((1, len(e)), np.float32)))
    assert grids == [(1, 8, 8)]
    with pytest.raises(PromptError, match=r"holds 16 image tokens but its 2 image\(s\) need 32"):
        inputs.prefill(Prompt(prompt.token_ids, prompt.images * 2), n, lambda p, g: features, _never)
    with pytest.raises(PromptError, match="image tokens lie past the prefill length 3"):
        inputs.prefill(prompt, 3, lambda p, g: features, _never)
    with pytest.raises(PromptError, match="holds 16 image tokens but no images were given"):
        inputs.prefill(Prompt(prompt.token_ids), n, None, _never)


def test_prefill_splices_image_features_over_the_image_tokens(exported: Path, prompt: Prompt) -> None:
    inputs = GraphInputs(load_spec(exported), exported)
    features = np.arange(16 * inputs.hidden, dtype=np.float32).reshape(16, inputs.hidden)
    fed: list[tuple[np.ndarray, np.ndarray]] = []

    def forward(embeds: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fed.append((embeds, positions))
        t = embeds.shape[0]
        return np.arange(t, dtype=np.int64)[None], np.full((1, t), 0.5, np.float32)

    result, delta = inputs.prefill(prompt, len(prompt), lambda patches, grid: features, forward)
    ((embeds, positions),) = fed
    is_image = prompt.token_ids == inputs.image_id
    np.testing.assert_array_equal(embeds[is_image], features)
    np.testing.assert_array_equal(embeds[~is_image], inputs.embed[prompt.token_ids[~is_image]])
    assert positions.shape == (3, 1, len(prompt)) and delta < 0  # 16 image tokens span a 4x4 grid of positions
    assert int(result.top1[0, 0]) == len(prompt) - 1 and set(result.stage_ms) == {"vision", "prefill"}
    text = Prompt(prompt.token_ids[~is_image])
    empty, delta = inputs.prefill(text, 0, None, _never)  # length 0 only resets
    assert empty.top1.shape == (1, 0) and empty.stage_ms == {} and delta == 0


def test_step_checks_and_window(exported: Path) -> None:
    inputs = GraphInputs(load_spec(exported), exported)
    tokens = np.array([[7, 8, 9]], dtype=np.int64)
    window = inputs.step(tokens, 10, length=12, write_kv=False, kv_end=None, rope_delta=-6)
    np.testing.assert_array_equal(window.embeds, inputs.embed[[7, 8, 9]])
    np.testing.assert_array_equal(window.positions, continuation_positions(10, 3, -6))
    assert (window.key_end, window.committed_length) == (13, 13)
    window = inputs.step(tokens, 10, length=20, write_kv=True, kv_end=18, rope_delta=0)
    assert (window.key_end, window.committed_length) == (18, 18)
    with pytest.raises(ValueError, match=r"step at slot 13 outside 0\.\.12: the cache holds 12 slots"):
        inputs.step(tokens, 13, length=12, write_kv=True, kv_end=None, rope_delta=0)
    with pytest.raises(ValueError, match=r"kv_end=12 needs write_kv=True and kv_end >= start \+ tokens \(13\)"):
        inputs.step(tokens, 10, length=12, write_kv=True, kv_end=12, rope_delta=0)
    with pytest.raises(ValueError, match=r"kv_end 15 reaches past the valid cache \(12 slots\)"):
        inputs.step(tokens, 10, length=12, write_kv=True, kv_end=15, rope_delta=0)
    with pytest.raises(CacheFullError, match=f"KV cache write of 3 token\\(s\\) at slot {CAPACITY - 1} exceeds"):
        inputs.step(tokens, CAPACITY - 1, length=CAPACITY - 1, write_kv=False, kv_end=None, rope_delta=0)
    with pytest.raises(ValueError, match="step token ids must lie in"):
        inputs.step(np.array([[inputs.vocab]]), 0, length=0, write_kv=False, kv_end=None, rope_delta=0)
