"""The host side shared by the ONNX Runtime and TensorRT backends
(:class:`blockpilot.runtime.graph_backend.GraphBackend`, driven here through a subclass that records its forwards)
and the ONNX Runtime backend's public feed hook, over a real export of the shipped model (torch-free at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export import export_onnx
from blockpilot.formats.onnx_spec import load_spec
from blockpilot.runtime.backend import BackendArgumentError, BackendError, CacheFullError, Prompt, PromptError
from blockpilot.runtime.graph_backend import GraphBackend
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


class _Recorder(GraphBackend):
    """A graph backend whose vision graph is ``encode`` and whose LM step is ``forward`` (``(embeds, positions)``
    in, ``(top1, prob)`` out); it records every forward's ``(embeds, positions, start, key_end)``."""

    backend_name = "recording"
    rollouts_note = "batch one"
    unsupported = BackendError

    def __init__(self, exported: Path, *, vision: str = "graph", encode: Any = None, forward: Any = _never) -> None:
        self._load_inputs(load_spec(exported), exported, vision=vision)
        self._image_encoder = encode
        self.forward_fn = forward
        self.calls: list[tuple[np.ndarray, np.ndarray, int, int]] = []

    def _forward(self, embeds: Any, positions: Any, start: int, key_end: int, mode: AttentionMode, *,
                 commit: bool, graph: bool, allowed: Any = None) -> Any:
        self.calls.append((embeds, positions, start, key_end))
        return self.forward_fn(embeds, positions)


def _ones(embeds: np.ndarray, _positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = embeds.shape[0]
    return np.zeros((1, t), np.int64), np.ones((1, t), np.float32)


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
    n = len(prompt)
    with pytest.raises(PromptError, match=f"the prompt has images but {missing}"):
        _Recorder(exported, vision=vision).prefill(prompt)
    features = np.zeros((16, _Recorder(exported).hidden), np.float32)
    # A frame of another size is resized by the export's image policy, never refused for its size.
    big = np.zeros((224, 224, 3), dtype=np.uint8)
    grids: list[tuple[int, int, int]] = []
    _Recorder(exported, encode=lambda p, g: grids.append(g) or features, forward=_ones).prefill(
        Prompt(prompt.token_ids, (big,)))
    assert grids == [(1, 8, 8)]
    backend = _Recorder(exported, encode=lambda p, g: features)
    with pytest.raises(PromptError, match=r"holds 16 image tokens but its 2 image\(s\) need 32"):
        backend.prefill(Prompt(prompt.token_ids, prompt.images * 2))
    with pytest.raises(PromptError, match="image tokens lie past the prefill length 3"):
        backend.prefill(prompt, length=3)
    with pytest.raises(PromptError, match="holds 16 image tokens but no images were given"):
        backend.prefill(Prompt(prompt.token_ids), length=n)
    assert backend.calls == [] and backend.length == 0


def test_prefill_splices_image_features_over_the_image_tokens(exported: Path, prompt: Prompt) -> None:
    hidden = _Recorder(exported).hidden
    features = np.arange(16 * hidden, dtype=np.float32).reshape(16, hidden)

    def forward(embeds: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = embeds.shape[0]
        return np.arange(t, dtype=np.int64)[None], np.full((1, t), 0.5, np.float32)

    backend = _Recorder(exported, encode=lambda patches, grid: features, forward=forward)
    result = backend.prefill(prompt)
    ((embeds, positions, start, key_end),) = backend.calls
    is_image = prompt.token_ids == backend.image_id
    np.testing.assert_array_equal(embeds[is_image], features)
    np.testing.assert_array_equal(embeds[~is_image], backend.embed[prompt.token_ids[~is_image]])
    assert positions.shape == (3, 1, len(prompt)) and (start, key_end) == (0, len(prompt))
    assert backend._rope_delta < 0  # 16 image tokens span a 4x4 grid of positions
    assert int(result.top1[0, 0]) == len(prompt) - 1 and set(result.stage_ms) == {"vision", "prefill"}
    assert backend.length == len(prompt)
    empty = backend.prefill(Prompt(prompt.token_ids[~is_image]), length=0)  # length 0 only resets
    assert empty.top1.shape == (1, 0) and empty.stage_ms == {} and backend._rope_delta == 0 and backend.length == 0


def test_step_checks_and_window(exported: Path) -> None:
    backend = _Recorder(exported, forward=_ones)
    tokens = np.array([[7, 8, 9]], dtype=np.int64)
    backend._length, backend._rope_delta = 12, -6
    backend.step(tokens, 10, mode=AttentionMode.CAUSAL, write_kv=False)
    embeds, positions, start, key_end = backend.calls[-1]
    np.testing.assert_array_equal(embeds, backend.embed[[7, 8, 9]])
    np.testing.assert_array_equal(positions, continuation_positions(10, 3, -6))
    assert (start, key_end, backend.length) == (10, 13, 12)  # a draft leaves the cache length alone
    backend._length, backend._rope_delta = 20, 0
    backend.step(tokens, 10, mode=AttentionMode.CAUSAL, write_kv=True, kv_end=18)
    assert (backend.calls[-1][3], backend.length) == (18, 18)
    backend._length = 12
    calls = len(backend.calls)
    with pytest.raises(BackendArgumentError, match=r"step at slot 13 outside 0\.\.12: the cache holds 12 slots"):
        backend.step(tokens, 13, mode=AttentionMode.CAUSAL, write_kv=True)
    with pytest.raises(BackendArgumentError,
                       match=r"kv_end=12 needs write_kv=True and kv_end >= start \+ tokens \(13\)"):
        backend.step(tokens, 10, mode=AttentionMode.CAUSAL, write_kv=True, kv_end=12)
    with pytest.raises(BackendArgumentError, match=r"kv_end 15 reaches past the valid cache \(12 slots\)"):
        backend.step(tokens, 10, mode=AttentionMode.CAUSAL, write_kv=True, kv_end=15)
    backend._length = CAPACITY - 1
    with pytest.raises(CacheFullError, match=rf"KV cache write of 3 token\(s\) at slot {CAPACITY - 1} exceeds"):
        backend.step(tokens, CAPACITY - 1, mode=AttentionMode.CAUSAL, write_kv=False)
    with pytest.raises(BackendArgumentError, match="step token ids must lie in"):
        backend.step(np.array([[backend.vocab]]), 0, mode=AttentionMode.CAUSAL, write_kv=False)
    assert len(backend.calls) == calls and backend.length == CAPACITY - 1  # refused calls change nothing
