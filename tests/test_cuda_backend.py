"""The CUDA backend's decode forward, checked on the CPU against the torch backend, and on a GPU when there is one.

On the CPU (``device="cpu"``, graphs off) the backend runs the very code a GPU runs, with the attention done by the
torch reference, or by the Triton kernels in Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1`` runs
this file as a script on a tiny text model and reports JSON). Parity: top-1 ids equal, probabilities within 1e-5,
the KV caches equal, and plans token for token equal through the Planner. The GPU tests (``-m gpu``) check graph
replay against eager, the Triton path against the torch backend on CUDA, FP8 against bf16, and plans.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from runtime_fixtures import TEXT_MASK, assert_same_step, image_prompt, text_model
from triton_interp import run_interpreted

from blockpilot.runtime.backend import CacheFullError, Prompt, Sampling
from blockpilot.runtime.cuda_backend import CudaBackend
from blockpilot.runtime.cuda_lm import top1_prob_ref
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError
from blockpilot.runtime.planner import Planner
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.loader import load_model
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.reference_model import SHIPPED_MODEL
from blockpilot.vla.tokenizer import Tokenizer

MODES = tuple(AttentionMode)
# (tokens, mode, write_kv, kv_end offset past the window or None); 70 is wider than every bucket (eager).
STEPS: tuple[tuple[int, AttentionMode, bool, int | None], ...] = (
    (1, AttentionMode.CAUSAL, True, None), (32, AttentionMode.BIDIRECTIONAL, False, None),
    (32, AttentionMode.BIDIRECTIONAL, True, None), (9, AttentionMode.BIDIRECTIONAL, True, 8),
    (5, AttentionMode.BLOCK, False, None), (7, AttentionMode.BLOCK, True, None), (3, AttentionMode.CAUSAL, False, None),
    (70, AttentionMode.CAUSAL, True, None), (12, AttentionMode.BIDIRECTIONAL, False, None),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _drive(a: Any, b: Any, prompt: Prompt, steps: Any = STEPS, seed: int = 0, tol: float = 1e-5,
           prefill_mode: AttentionMode = AttentionMode.CAUSAL) -> None:
    """The same prefill and steps on two backends (each step at the current end, a draft then a rewind)."""
    vocab = a.config.lm.vocab_size
    rng = np.random.default_rng(seed)
    assert_same_step(a.prefill(prompt, mode=prefill_mode), b.prefill(prompt, mode=prefill_mode), tol)
    for t, mode, write_kv, extra in steps:
        start = max(0, a.length - 2)  # overlap the valid cache a little: drafts must leave it intact
        tokens = rng.integers(8, vocab - 8, (1, t))
        kv_end = None if extra is None else start + t + extra
        if kv_end is not None:  # the sub-block cache: the rest of the block was written before
            for x in (a, b):
                x.step(np.zeros((1, t + extra), dtype=np.int64) + 9, start, mode=mode, write_kv=True)
        assert_same_step(a.step(tokens, start, mode=mode, write_kv=write_kv, kv_end=kv_end),
              b.step(tokens, start, mode=mode, write_kv=write_kv, kv_end=kv_end), tol)
        assert a.length == b.length


def _caches_equal(torch_backend: TorchBackend, cuda: CudaBackend, atol: float = 1e-5) -> None:
    n = torch_backend.length
    k, v = cuda._single
    torch.testing.assert_close(k[..., :n, :].float(), torch_backend._single.k[..., :n, :].float(), atol=atol, rtol=0)
    torch.testing.assert_close(v[..., :n, :].float(), torch_backend._single.v[..., :n, :].float(), atol=atol, rtol=0)


@pytest.mark.parametrize("buckets", [None, ()], ids=["padded-buckets", "exact-widths"])
def test_decode_forward_matches_the_torch_backend(shipped: tuple[VLAModel, Tokenizer],
                                                  buckets: tuple[int, ...] | None) -> None:
    model, tokenizer = shipped
    prompt = image_prompt(tokenizer, text_tokens=30)
    ref, ours = TorchBackend(model, 320), CudaBackend(model, 320, device="cpu", buckets=buckets)
    assert (ours.kernel, ours.graphs.enabled, ours.precision) == ("reference", False, "fp32")
    _drive(ref, ours, prompt)
    _caches_equal(ref, ours)
    for mode in MODES:  # the prefill's own mode
        assert_same_step(ref.prefill(prompt, mode=mode), ours.prefill(prompt, mode=mode))


@pytest.mark.parametrize("name", ["ar", "block", "block-sub-cache", "scaffold", "rollouts"])
def test_plans_equal_the_torch_backends(shipped: tuple[VLAModel, Tokenizer], name: str) -> None:
    from blockpilot.eval.synthetic import heldout_keyframes, observation

    model, tokenizer = shipped
    special = {"block-sub-cache": DecoderSettings(name="block", sub_block_cache=True),
               "rollouts": DecoderSettings(name="rollouts", rollouts=3)}
    settings = special[name] if name in special else DecoderSettings(name=name)
    ref = Planner.from_model(model, tokenizer, decoder=settings)
    backend = CudaBackend(model, ref.backend.capacity, max_batch=3 if name == "rollouts" else 1, device="cpu")
    ours = Planner(backend, model.config, tokenizer, decoder=settings)
    for key in heldout_keyframes(1, stride=8)[:2]:
        a, b = ref.plan(observation(key)), ours.plan(observation(key))
        assert np.array_equal(a.tokens, b.tokens)
        assert (a.stats.forwards, a.error is None) == (b.stats.forwards, b.error is None)


def test_sampling_and_forked_rows_match(shipped: tuple[VLAModel, Tokenizer]) -> None:
    model, tokenizer = shipped
    prompt = image_prompt(tokenizer, text_tokens=20)
    ref, ours = TorchBackend(model, 200, max_batch=3), CudaBackend(model, 200, max_batch=3, device="cpu")
    for x in (ref, ours):
        x.prefill(prompt)
        x.fork(3)
    tokens = np.random.default_rng(1).integers(30, 700, (3, 6))
    sampling = Sampling(0.7, (11, 12, 13))
    a = ref.step(tokens, len(prompt), mode=AttentionMode.CAUSAL, write_kv=True, sampling=sampling)
    b = ours.step(tokens, len(prompt), mode=AttentionMode.CAUSAL, write_kv=True, sampling=sampling)
    assert_same_step(a, b)
    assert a.sampled is not None and b.sampled is not None and np.array_equal(a.sampled, b.sampled)
    assert_same_step(ref.step(tokens[:, :2], len(prompt) + 6, mode=AttentionMode.BIDIRECTIONAL, write_kv=False),
          ours.step(tokens[:, :2], len(prompt) + 6, mode=AttentionMode.BIDIRECTIONAL, write_kv=False))


def test_bookkeeping_and_typed_errors(shipped: tuple[VLAModel, Tokenizer]) -> None:
    model, tokenizer = shipped
    backend = CudaBackend(model, 96, max_batch=2, device="cpu")
    prompt = image_prompt(tokenizer, text_tokens=10)
    with pytest.raises(ValueError, match="batch-one"):
        backend.prefill(prompt)
        backend.fork(2)
        backend.fork(2)
    backend.prefill(prompt)
    assert backend.length == len(prompt) and backend.prefill(Prompt(np.arange(30, 60)), length=0).top1.shape == (1, 0)
    assert backend.length == 0
    backend.prefill(prompt)
    with pytest.raises(ValueError, match="gap"):
        backend.step(np.ones((1, 2), dtype=np.int64), len(prompt) + 1, mode=AttentionMode.CAUSAL, write_kv=True)
    with pytest.raises(ValueError, match="needs write_kv"):
        backend.step(np.ones((1, 2), dtype=np.int64), 3, mode=AttentionMode.CAUSAL, write_kv=False, kv_end=9)
    with pytest.raises(CacheFullError):
        backend.step(np.ones((1, 90), dtype=np.int64), len(prompt), mode=AttentionMode.CAUSAL, write_kv=False)
    with pytest.raises(ValueError, match="seeds"):
        backend.step(np.ones((1, 2), dtype=np.int64), 3, mode=AttentionMode.CAUSAL, write_kv=True,
                     sampling=Sampling(1.0, (1, 2)))
    with pytest.raises(ValueError, match="max_batch"):
        backend.fork(3)
    backend.truncate(5)
    assert backend.length == 5
    with pytest.raises(ValueError, match="truncate"):
        backend.truncate(6)


def test_setup_errors_name_what_is_missing(shipped: tuple[VLAModel, Tokenizer]) -> None:
    model, _ = shipped
    with pytest.raises(PlannerSetupError, match="runs on a CUDA device"):
        CudaBackend(model, 64)  # the model is on the CPU and no device was asked for
    with pytest.raises(PlannerSetupError, match="CUDA graphs"):
        CudaBackend(model, 64, device="cpu", graphs=True)
    with pytest.raises(PlannerSetupError, match="precision"):
        CudaBackend(model, 64, device="cpu", precision="int4")
    with pytest.raises(PlannerSetupError, match="runs on a CUDA device"):
        Planner.from_checkpoint(SHIPPED_MODEL, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(PlannerSetupError, match="needs a CUDA GPU"):
            CudaBackend(model, 64, device="cuda")
        with pytest.raises(PlannerSetupError, match="no CUDA device"):
            Planner.from_checkpoint(SHIPPED_MODEL, backend="cuda", device="cuda")


def test_top1_reference_excludes_the_mask_and_leaves_logits_alone() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 2.0, -1.0]])
    top1, prob = top1_prob_ref(logits, mask_id=1)
    assert top1.tolist() == [2, 0] and logits[0, 1] == 5.0
    torch.testing.assert_close(prob, torch.tensor([np.e / (1 + np.e), 1 / (1 + np.exp(-3.0))], dtype=torch.float32))


# --- the Triton kernels in Triton's interpreter -----------------------------------------------------------------


def _interpreted_cases() -> dict[str, Any]:
    """In the subprocess (TRITON_INTERPRET=1): the backend on the Triton kernels vs the torch backend, and the
    top-1 kernel vs its reference over several vocabulary splits."""
    from blockpilot.kernels.top1 import SPLIT_SIZE, top1_prob

    model = text_model(0)
    report: dict[str, Any] = {}
    ref = TorchBackend(model, 160, max_batch=2)
    ours = CudaBackend(model, 160, max_batch=2, device="cpu", kernel="triton")
    steps = [(s[0] if s[0] < 40 else 40, *s[1:]) for s in STEPS]
    try:
        # 5e-5: the fused norms reduce in another order than torch's (float32 rounding, ~1e-5 on the probabilities)
        _drive(ref, ours, Prompt(np.arange(5, 29)), steps=steps, tol=5e-5, prefill_mode=AttentionMode.BLOCK)
        _caches_equal(ref, ours, atol=5e-5)
        for x in (ref, ours):  # two rows fold into the kernel's heads
            x.fork(2)
        tokens = np.random.default_rng(3).integers(0, 58, (2, 5))
        assert_same_step(ref.step(tokens, ref.length, mode=AttentionMode.BIDIRECTIONAL, write_kv=False),
              ours.step(tokens, ours.length, mode=AttentionMode.BIDIRECTIONAL, write_kv=False), tol=5e-5)
        report["backend"] = "ok"
    except AssertionError as exc:
        report["backend"] = f"mismatch: {exc!r}"
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2 * SPLIT_SIZE + 123, generator=gen)
    logits[0, 5000] = 50.0  # the mask id: never the answer
    logits[1, [7, SPLIT_SIZE + 9]] = 30.0  # a tie across splits: the lowest id wins
    got, want = top1_prob(logits, 5000), top1_prob_ref(logits, 5000)
    report["top1_equal"] = bool(torch.equal(got[0], want[0]))
    report["top1_ids"] = got[0].tolist()
    report["prob_diff"] = float((got[1] - want[1]).abs().max())
    small = top1_prob(torch.randn(2, 4, TEXT_MASK + 4, generator=gen).to(torch.float16), TEXT_MASK)
    report["fp16_shape"] = list(small[0].shape)
    return report


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    return run_interpreted(__file__, timeout_s=900)


def test_triton_kernels_in_the_interpreter_match(interpreted: dict[str, Any]) -> None:
    assert interpreted["backend"] == "ok", interpreted["backend"]
    assert interpreted["top1_equal"] and interpreted["top1_ids"][1] == 7
    assert interpreted["prob_diff"] <= 1e-6
    assert interpreted["fp16_shape"] == [2, 4]


# --- on a GPU ---------------------------------------------------------------------------------------------------


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_cuda(shipped: tuple[VLAModel, Tokenizer]) -> None:
    _cuda()
    model = load_model(SHIPPED_MODEL, device="cuda")
    prompt = image_prompt(shipped[1], text_tokens=30)
    eager, graphed = CudaBackend(model, 320, graphs=False), CudaBackend(model, 320)
    _drive(eager, graphed, prompt, tol=0.0)
    _drive(eager, graphed, prompt, seed=1, tol=0.0)  # the second pass replays the captured graphs
    assert graphed.graphs.captures == len(graphed.graphs) > 3 and eager.graphs.captures == 0


@pytest.mark.gpu
def test_triton_path_equals_the_torch_backend_on_cuda(shipped: tuple[VLAModel, Tokenizer]) -> None:
    _cuda()
    model = load_model(SHIPPED_MODEL, device="cuda")
    prompt = image_prompt(shipped[1], text_tokens=30)
    _drive(TorchBackend(model, 320), CudaBackend(model, 320), prompt, tol=1e-4)


@pytest.mark.gpu
def test_fp8_path_stays_close_to_bf16_on_cuda(shipped: tuple[VLAModel, Tokenizer]) -> None:
    _cuda()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    model = load_model(SHIPPED_MODEL, device="cuda", dtype="bfloat16")
    prompt = image_prompt(shipped[1], text_tokens=30)
    agree = []
    for per_channel in (True, False):
        bf16 = CudaBackend(model, 320)
        fp8 = CudaBackend(model, 320, precision="fp8", fp8_per_channel=per_channel)
        a, b = bf16.prefill(prompt), fp8.prefill(prompt)
        tokens = np.arange(40, 72)[None]
        for mode in MODES:
            x = bf16.step(tokens, len(prompt), mode=mode, write_kv=False)
            y = fp8.step(tokens, len(prompt), mode=mode, write_kv=False)
            agree.append(float((x.top1 == y.top1).mean()))
            assert float(np.abs(x.prob - y.prob).mean()) < 0.05
        assert a.top1.shape == b.top1.shape
    assert float(np.mean(agree)) > 0.8


@pytest.mark.gpu
def test_plans_equal_the_torch_backend_on_cuda() -> None:
    _cuda()
    from blockpilot.eval.synthetic import heldout_keyframes, observation

    for name in ("scaffold", "block", "ar"):
        settings = DecoderSettings(name=name)
        ref = Planner.from_checkpoint(SHIPPED_MODEL, decoder=settings, device="cuda")
        ours = Planner.from_checkpoint(SHIPPED_MODEL, decoder=settings, device="cuda", backend="cuda")
        assert isinstance(ours.backend, CudaBackend)
        for key in heldout_keyframes(1, stride=8)[:2]:
            assert np.array_equal(ref.plan(observation(key)).tokens, ours.plan(observation(key)).tokens), name


if __name__ == "__main__":
    # The interpreted run of the `interpreted` fixture: TRITON_INTERPRET=1 is already in the environment.
    torch.set_num_threads(1)
    print(json.dumps(_interpreted_cases()))
