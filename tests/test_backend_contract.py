"""The backend contract checked once (:func:`blockpilot.runtime.backend.check_step`, ``check_fork``,
``check_truncate``): each bad argument raises its typed error, and every backend that runs on this CPU (torch,
cuda on its CPU path, ONNX Runtime over an export of the same model) refuses the same calls with the same words,
before any forward, leaving its cache as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import TEXT_VOCAB, text_model

from blockpilot.runtime.backend import (
    AllowedTokens,
    BackendArgumentError,
    BackendError,
    CacheFullError,
    Prompt,
    Sampling,
    check_fork,
    check_step,
    check_truncate,
)
from blockpilot.vla.modes import AttentionMode

CAPACITY = 24
CAUSAL = AttentionMode.CAUSAL
PROMPT = Prompt(np.arange(3, 13, dtype=np.int64))  # 10 tokens
P = len(PROMPT)


def _ids(batch: int, t: int) -> np.ndarray:
    return np.full((batch, t), 5, dtype=np.int64)


def _step(**over: Any) -> Any:
    """:func:`check_step` of a 3-token step at slot 10 over 12 valid slots of 24, batch one, vocabulary 64."""
    args: dict[str, Any] = {"tokens": _ids(1, 3), "start": 10, "length": 12, "capacity": CAPACITY, "batch": 1,
                            "vocab_size": TEXT_VOCAB, "write_kv": True, "kv_end": None}
    args.update(over)
    tokens, start = args.pop("tokens"), args.pop("start")
    return check_step(tokens, start, **args)


def test_a_good_step_reports_its_key_end() -> None:
    assert _step().key_end == 13 and _step(write_kv=False).key_end == 13
    assert _step(kv_end=13).key_end == 13
    assert _step(length=20, kv_end=18).key_end == 18  # kv_end may reach slots written before
    assert _step(tokens=_ids(1, 14), length=12, kv_end=24).key_end == 24  # ... or end the window itself
    assert _step(start=12).tokens.shape == (1, 3)  # a step at the end of the valid cache


@pytest.mark.parametrize(("over", "error", "words"), [
    ({"tokens": np.array([5, 6])}, BackendArgumentError, r"shape \(1, T>0\), got \(2,\)"),
    ({"tokens": _ids(2, 3)}, BackendArgumentError, r"shape \(1, T>0\), got \(2, 3\)"),
    ({"tokens": _ids(1, 0)}, BackendArgumentError, r"shape \(1, T>0\), got \(1, 0\)"),
    ({"tokens": np.array([[5, -1]])}, BackendArgumentError, r"\[0, 64\), got range \[-1, 5\]"),
    ({"tokens": np.array([[64]])}, BackendArgumentError, r"\[0, 64\), got range \[64, 64\]"),
    ({"start": -1}, BackendArgumentError, r"step at slot -1 outside 0\.\.12"),
    ({"start": 13}, BackendArgumentError, r"step at slot 13 outside 0\.\.12: .* would leave a gap"),
    ({"sampling": Sampling(1.0, (1, 2))}, BackendArgumentError, r"sampling needs 1 seeds \(one per row\), got 2"),
    ({"kv_end": 13, "write_kv": False}, BackendArgumentError, r"kv_end=13 needs write_kv=True"),
    ({"kv_end": 12}, BackendArgumentError, r"kv_end >= start \+ tokens \(13\)"),
    ({"kv_end": 15}, BackendArgumentError, r"kv_end 15 reaches past the valid cache \(12 slots\)"),
    ({"start": 12, "tokens": _ids(1, 13)}, CacheFullError, r"KV cache write of 13 token\(s\) at slot 12 exceeds "
                                                           r"capacity 24"),
    ({"start": 12, "tokens": _ids(1, 13), "write_kv": False}, CacheFullError, "exceeds capacity 24"),
    ({"allowed": AllowedTokens(np.ones((2, TEXT_VOCAB), bool), np.zeros((1, 2), np.int64))}, BackendArgumentError,
     r"allowed-token classes must have shape \(1, 3\)"),
    ({"allowed": AllowedTokens(np.ones((2, TEXT_VOCAB), bool), np.full((1, 3), 2))}, BackendArgumentError,
     r"allowed-token classes must lie in \[0, 2\)"),
    ({"allowed": AllowedTokens(np.ones((2, 7), bool), np.zeros((1, 3), np.int64))}, BackendArgumentError,
     r"allowed-token table must be bool \(C, 64\)"),
])
def test_each_bad_step_argument_raises_its_typed_error(over: dict[str, Any], error: type[Exception],
                                                       words: str) -> None:
    with pytest.raises(error, match=words):
        _step(**over)


def test_argument_errors_are_backend_errors_and_value_errors() -> None:
    # A node catches BackendError; code written against the old ValueError keeps working.
    assert issubclass(BackendArgumentError, BackendError) and issubclass(BackendArgumentError, ValueError)
    assert issubclass(CacheFullError, BackendError)


@pytest.mark.parametrize(("n", "rows", "max_batch", "words"), [
    (0, 1, 4, r"fork\(0\) needs at least one row"),
    (2, 2, 4, r"fork\(\) needs a batch-one cache; prefill first"),
    (5, 1, 4, r"fork\(5\) exceeds this backend's max_batch 4"),
])
def test_bad_forks_raise(n: int, rows: int, max_batch: int, words: str) -> None:
    with pytest.raises(BackendArgumentError, match=words):
        check_fork(n, rows=rows, max_batch=max_batch)
    check_fork(max_batch, rows=1, max_batch=max_batch)


@pytest.mark.parametrize("length", [-1, 13])
def test_bad_truncates_raise(length: int) -> None:
    with pytest.raises(BackendArgumentError, match=rf"truncate\({length}\) outside 0\.\.12"):
        check_truncate(length, 12)
    check_truncate(0, 12)
    check_truncate(12, 12)


# --- every CPU backend refuses the same calls through the shared checks -------------------------------------------


def _torch() -> Any:
    from blockpilot.runtime.torch_backend import TorchBackend

    return TorchBackend(text_model(0), CAPACITY, max_batch=2)


def _cuda_on_cpu() -> Any:
    from blockpilot.runtime.cuda_backend import CudaBackend

    return CudaBackend(text_model(0), CAPACITY, max_batch=2, device="cpu")


@pytest.fixture(scope="module")
def ort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.export import export_onnx

    out = tmp_path_factory.mktemp("contract_onnx")
    export_onnx(text_model(0), out, CAPACITY)
    return out


@pytest.fixture(params=["torch", "cuda-cpu", "onnxruntime"])
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "onnxruntime":
        from blockpilot.runtime.ort_backend import OrtBackend

        made = OrtBackend(request.getfixturevalue("ort_dir"))
    else:
        made = _torch() if request.param == "torch" else _cuda_on_cpu()
    made.prefill(PROMPT)
    return made


@pytest.mark.parametrize(("call", "error", "words"), [
    (lambda b: b.step(_ids(1, 2), P + 1, mode=CAUSAL, write_kv=True), BackendArgumentError, "leave a gap"),
    (lambda b: b.step(_ids(1, 2), -1, mode=CAUSAL, write_kv=True), BackendArgumentError, "outside"),
    (lambda b: b.step(_ids(1, 2), P, mode=CAUSAL, write_kv=False, kv_end=P + 2), BackendArgumentError,
     "needs write_kv=True"),
    (lambda b: b.step(_ids(1, 2), P - 4, mode=CAUSAL, write_kv=True, kv_end=P - 3), BackendArgumentError,
     r"kv_end >= start \+ tokens"),
    (lambda b: b.step(_ids(1, 2), P, mode=CAUSAL, write_kv=True, kv_end=P + 5), BackendArgumentError,
     "reaches past the valid cache"),
    (lambda b: b.step(np.array([[TEXT_VOCAB]]), P, mode=CAUSAL, write_kv=True), BackendArgumentError,
     "step token ids must lie in"),
    (lambda b: b.step(_ids(1, CAPACITY - P + 1), P, mode=CAUSAL, write_kv=False), CacheFullError,
     "exceeds capacity"),
    (lambda b: b.fork(0), BackendArgumentError, r"fork\(0\) needs at least one row"),
    (lambda b: b.truncate(P + 1), BackendArgumentError, rf"truncate\({P + 1}\) outside 0\.\.{P}"),
])
def test_every_cpu_backend_refuses_bad_calls_alike(backend: Any, call: Callable[[Any], Any],
                                                   error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        call(backend)
    assert backend.length == P  # nothing was written
    res = backend.step(_ids(1, 2), P, mode=CAUSAL, write_kv=True)  # and the backend still runs
    assert res.top1.shape == (1, 2) and backend.length == P + 2


def test_kv_end_may_reach_written_slots_on_every_cpu_backend(backend: Any) -> None:
    backend.step(_ids(1, 4), P, mode=CAUSAL, write_kv=True)
    res = backend.step(_ids(1, 2), P, mode=AttentionMode.BIDIRECTIONAL, write_kv=True, kv_end=P + 4)
    assert res.top1.shape == (1, 2) and backend.length == P + 4
