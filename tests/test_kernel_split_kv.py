"""The split-KV (flash-decoding) path of the block-attention kernel, its log-sum-exp, and the attention-state merge.

As in ``test_kernel_block_attention.py``, the Triton kernels run on CPU in Triton's interpreter in one subprocess
(this file as a script, ``TRITON_INTERPRET=1``) that reports max abs differences as JSON: every split case at 1,
2, 3 and 7 splits against the torch reference (the output) and ``torch.logsumexp`` of the masked scores (the
log-sum-exp), the merge kernel against its torch reference, and the CUDA backend's decode forward with the kernel
forced to 3 splits against the torch backend. The subprocess computes only the cases the selected tests read: in
the default run one small case (``FAST_SPLIT_CASE``, at every split count) and the merge; the other cases and the
decode forward (minutes in the interpreter) are marked ``slow``. The CUDA tests check the 3B shape (16/2 heads,
head_dim 128, a 1,024-slot cache), one captured CUDA graph replayed at several positions, and the merge.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import torch
from test_kernel_block_attention import _inputs  # the one-pass cases' inputs, for these cases too
from triton_interp import run_interpreted, selected_params, selected_tests

from blockpilot.kernels.reference import block_diffusion_attention_ref, write_window
from blockpilot.vla.modes import AttentionMode

SPLITS = (1, 2, 3, 7)
# Split-KV cases, each at every count in SPLITS, key tiles of 16: GQA 16/2 and 4/4, key_end off the tile grid,
# start 0, a range shorter than 7 tiles (empty splits), fp16; key_end 0 (no query sees a key: zeros, lse -inf).
SPLIT_CASES: dict[str, dict[str, Any]] = {
    **{f"gqa16-2-{n}": dict(h=16, hkv=2, t=32, c=160, d=32, start=90, end=end, mode=m, bs=32, tiles=(32, 16))
       for m, n, end in ((0, "causal", None), (1, "block", 131), (2, "bidirectional", 137))},
    **{f"mha4-4-{n}": dict(h=4, hkv=4, t=12, c=80, d=24, start=20, end=45, mode=m, bs=16, tiles=(None, 16))
       for m, n in ((0, "causal"), (1, "block"), (2, "bidirectional"))},
    "prefill-causal-start-0": dict(h=4, hkv=2, t=40, c=64, d=32, start=0, end=None, mode=0, bs=8, tiles=(16, 16)),
    "few-tiles-empty-splits": dict(h=4, hkv=1, t=3, c=64, d=16, start=30, end=None, mode=2, bs=8, tiles=(16, 16)),
    "fp16-gqa16-2-bidirectional": dict(h=16, hkv=2, t=32, c=128, d=64, start=60, end=None, mode=2, bs=32,
                                       tiles=(None, 16), dtype="float16"),
    "no-key": dict(h=4, hkv=2, t=4, c=32, d=16, start=0, end=0, mode=0, bs=4, tiles=(16, 16)),
}
FAST_SPLIT_CASE = "mha4-4-block"  # the default run's representative; the rest are `slow`


def _masked_scores(x: dict[str, Any], case: dict[str, Any]) -> torch.Tensor:
    """float32 ``(1, H, T, key_end)`` scores, ``-inf`` where the mode forbids the key."""
    from blockpilot.kernels.reference import allowed_keys

    groups = case["h"] // case["hkv"]
    keys = x["k_cache"][:, :, :x["key_end"]].float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(x["q"].float(), keys.transpose(2, 3)) * x["scale"]
    slots = x["start"] + torch.arange(case["t"], device=x["q"].device)
    allowed = allowed_keys(slots, x["key_end"], case["mode"], case["bs"])
    return scores.masked_fill(~allowed, float("-inf"))


def _run_split_cases(names: list[str]) -> dict[str, dict[str, float]]:
    """In the subprocess: the split-KV path of the cases ``names`` at every count in SPLITS against the reference
    and logsumexp."""
    from blockpilot.kernels.block_attention import (
        attention_with_lse,
        attention_workspace,
        block_diffusion_attention,
        workspace_numel,
    )

    results: dict[str, dict[str, float]] = {}
    storage = torch.full((workspace_numel(16, 32, 64, 7) + 5,), float("nan"))  # one buffer: every shape's views
    for i, (name, case) in enumerate(SPLIT_CASES.items()):
        if name not in names:
            continue
        x = _inputs(case, seed=50 + i)
        x["k_cache"] = write_window(x["past_k"], x["k_new"], x["start"])
        x["v_cache"] = write_window(x["past_v"], x["v_new"], x["start"])
        args = (x["q"], x["k_cache"], x["v_cache"], x["start"], x["key_end"], case["mode"], case["bs"], x["scale"])
        ref = block_diffusion_attention_ref(*args).nan_to_num(0.0)  # the kernels give 0 where the reference NaN
        want_lse = torch.logsumexp(_masked_scores(x, case), dim=-1)
        bm, bn = case["tiles"]
        for splits in SPLITS:
            ws = None if splits == 1 else attention_workspace(case["h"], case["t"], case["d"], splits,
                                                              torch.device("cpu"), storage=storage)
            out, lse = attention_with_lse(*args, block_m=bm, block_n=bn, num_splits=splits, workspace=ws)
            plain = block_diffusion_attention(*args, block_m=bm, block_n=bn, num_splits=splits)
            lse_ok = torch.isneginf(want_lse) == torch.isneginf(lse)
            results[f"split-{name}-{splits}"] = {
                "attn": (out.float() - ref).abs().max().item(),
                "lse": (lse - want_lse).nan_to_num(0.0).abs().max().item(),  # -inf - -inf: checked by lse_inf
                "lse_inf": float(lse_ok.all()), "plain": (plain.float() - out.float()).abs().max().item(),
                "dtype_kept": float(out.dtype == x["q"].dtype and lse.dtype == torch.float32)}
    return results


def _merge_inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    out_a, out_b = (torch.randn(2, 3, 5, 24, generator=gen).to(dtype) for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(2, 3, 5, generator=gen) for _ in range(2))
    lse_a[0, 0, :2] = float("-inf")  # A empty
    lse_b[0, 1, 1:3] = float("-inf")  # B empty
    lse_a[1, 2, 3:] = lse_b[1, 2, 3:] = float("-inf")  # both empty: 0 and -inf
    out_a[0, 0, 0] = float("nan")  # an empty state's output weighs nothing
    return out_a, lse_a, out_b, lse_b


def _run_merge_cases() -> dict[str, dict[str, float]]:
    """In the subprocess: the Triton merge of two states against the torch one."""
    from blockpilot.kernels.merge import merge_attention_states, merge_attention_states_ref

    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.float16):
        states = _merge_inputs(7, dtype)
        (out, lse), (want, want_lse) = merge_attention_states(*states), merge_attention_states_ref(*states)
        results[f"merge-{str(dtype).removeprefix('torch.')}"] = {
            "attn": (out.float() - want.float()).abs().max().item(),
            "lse": (lse - want_lse).nan_to_num(0.0).abs().max().item(),
            "lse_inf": float(torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))),
            "both_empty": float(not out[1, 2, 3:].any() and bool(torch.isneginf(lse[1, 2, 3:]).all())),
            "dtype_kept": float(out.dtype == dtype and lse.dtype == torch.float32)}
    return results


def _run_decode_forward_split() -> dict[str, float]:
    """In the subprocess: the CUDA backend's decode forward with the kernel forced to 3 splits (its workspace
    carved from, and regrown in, one buffer) against the torch backend."""
    import numpy as np
    from runtime_fixtures import text_model

    from blockpilot.kernels import block_attention
    from blockpilot.runtime.backend import Prompt
    from blockpilot.runtime.cuda_backend import CudaBackend
    from blockpilot.runtime.torch_backend import TorchBackend

    block_attention.default_num_splits = lambda *args, **kwargs: 3
    model = text_model(1)
    ref, ours = TorchBackend(model, 96, max_batch=2), CudaBackend(model, 96, max_batch=2, device="cpu",
                                                                  kernel="triton")
    diffs, equal = [], True
    rng = np.random.default_rng(0)
    results = [(ref.prefill(Prompt(np.arange(5, 29))), ours.prefill(Prompt(np.arange(5, 29))))]
    steps = ((8, AttentionMode.BIDIRECTIONAL, False), (5, AttentionMode.BLOCK, True), (1, AttentionMode.CAUSAL, True))
    for t, mode, write_kv in steps:
        tokens = rng.integers(8, 56, (1, t))
        results.append((ref.step(tokens, ref.length, mode=mode, write_kv=write_kv),
                        ours.step(tokens, ours.length, mode=mode, write_kv=write_kv)))
    for x in (ref, ours):
        x.fork(2)
    tokens = rng.integers(8, 56, (2, 20))  # twice the rows of the prefill's bucket: the workspace regrows
    results.append((ref.step(tokens, ref.length, mode=AttentionMode.BIDIRECTIONAL, write_kv=False),
                    ours.step(tokens, ours.length, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)))
    for a, b in results:
        equal = equal and bool(np.array_equal(a.top1, b.top1))
        diffs.append(float(np.abs(a.prob - b.prob).max()))
    return {"top1_equal": float(equal), "prob": max(diffs), "regrown": float(len(ours.lm._retired) > 1)}


DECODE_FORWARD = "--decode-forward"


def _run_interpreted_cases(args: list[str]) -> dict[str, Any]:
    """The split cases named in ``args``, the merge, and the decode forward if ``args`` holds DECODE_FORWARD."""
    decode = {"decode-forward-split-kv": _run_decode_forward_split()} if DECODE_FORWARD in args else {}
    return {**_run_split_cases(args), **_run_merge_cases(), **decode}


@pytest.fixture(scope="module")
def interpreted(request: pytest.FixtureRequest) -> dict[str, dict[str, float]]:
    """The interpreter's results for the selected tests only (see the module docstring)."""
    decode = [DECODE_FORWARD] if "test_decode_forward_on_split_kv_matches_the_torch_backend" in selected_tests(
        request) else []
    return run_interpreted(__file__, *selected_params(request, "name"), *decode)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == FAST_SPLIT_CASE else pytest.mark.slow)
                                  for n in SPLIT_CASES])
@pytest.mark.parametrize("splits", SPLITS)
def test_split_kv_matches_reference_interpreted(interpreted: dict[str, dict[str, float]], name: str,
                                                splits: int) -> None:
    got = interpreted[f"split-{name}-{splits}"]
    fp16 = SPLIT_CASES[name].get("dtype") == "float16"
    assert got["attn"] <= (2e-3 if fp16 else 1e-5), got
    assert got["lse"] <= (2e-3 if fp16 else 1e-5) and got["lse_inf"] == 1.0, got
    assert got["plain"] == 0.0 and got["dtype_kept"] == 1.0, got


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merge_kernel_matches_reference_interpreted(interpreted: dict[str, dict[str, float]], dtype: str) -> None:
    got = interpreted[f"merge-{dtype}"]
    assert got["attn"] <= (1e-3 if dtype == "float16" else 1e-6) and got["lse"] <= 1e-6, got
    assert got["lse_inf"] == got["both_empty"] == got["dtype_kept"] == 1.0, got


@pytest.mark.slow  # ~25 s in the interpreter; test_cuda_backend.py runs the backend on the Triton kernels by default
def test_decode_forward_on_split_kv_matches_the_torch_backend(interpreted: dict[str, dict[str, float]]) -> None:
    got = interpreted["decode-forward-split-kv"]
    assert got["top1_equal"] == 1.0 and got["prob"] <= 1e-5 and got["regrown"] == 1.0, got


def test_merge_reference_is_attention_over_the_union() -> None:
    """Two disjoint halves of the keys, merged, give attention over all of them; an empty half (a softmax over
    nothing: NaN output, lse -inf) leaves the other half's state."""
    from blockpilot.kernels.merge import merge_attention_states_ref

    gen = torch.Generator().manual_seed(5)
    scores, values = torch.randn(3, 6, 20, generator=gen), torch.randn(3, 20, 16, generator=gen)
    scores[0, :, :10] = float("-inf")
    halves = []
    for part in (slice(0, 10), slice(10, 20)):
        s = scores[..., part]
        halves += [torch.softmax(s, -1) @ values[:, part], torch.logsumexp(s, -1)]
    out, lse = merge_attention_states_ref(*halves)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="shape without D"):
        merge_attention_states_ref(halves[0], halves[1][..., :2], halves[2], halves[3])


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _shape_3b(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast-dDrive 3B attention at batch one: 16 query heads, 2 K/V heads, head_dim 128, a 1,024-slot cache."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, 128, generator=gen).to(dtype).cuda() for h, n in ((16, 32), (2, 1024), (2, 1024)))
    return q, k, v


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_kv_at_the_3b_shape_on_cuda(dtype: torch.dtype) -> None:
    _cuda()
    from blockpilot.kernels.block_attention import attention_with_lse, default_num_splits

    q, k, v = _shape_3b(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert default_num_splits(16, 2, 32, 1024, q.device) > 1  # 8 programs unsplit: fewer than the SMs
    for start, key_end, mode in ((992, 1024, 2), (500, 532, 1), (37, 69, 0), (960, 1001, 2), (0, 32, 1)):
        args = (q, k, v, start, key_end, mode, 32, 128 ** -0.5)
        ref = block_diffusion_attention_ref(*args)
        case = dict(h=16, hkv=2, t=32, mode=mode, bs=32)
        x = dict(q=q, k_cache=k, start=start, key_end=key_end, scale=128 ** -0.5)
        want_lse = torch.logsumexp(_masked_scores(x, case), dim=-1)
        for splits in (None, 1, 8, 40):
            out, lse = attention_with_lse(*args, num_splits=splits)
            assert (out.float() - ref).abs().max().item() <= tol, (start, key_end, mode, splits)
            assert (lse - want_lse).abs().max().item() <= tol, (start, key_end, mode, splits)


@pytest.mark.gpu
def test_one_captured_split_kv_launch_serves_every_position_on_cuda() -> None:
    _cuda()
    from blockpilot.kernels.block_attention import attention_workspace, block_diffusion_attention, default_num_splits

    q, k, v = _shape_3b(torch.float16)
    scalars = torch.tensor([0, 32, 2], dtype=torch.int32, device="cuda")
    splits = default_num_splits(16, 2, 32, 1024, q.device)
    workspace, out = attention_workspace(16, 32, 128, splits, q.device), torch.empty_like(q)

    def launch() -> None:
        block_diffusion_attention(q, k, v, scalars[0:1], scalars[1:2], scalars[2:3], 32, 128 ** -0.5, out=out,
                                  workspace=workspace)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for start, key_end, mode in ((992, 1024, 2), (100, 132, 1), (500, 545, 0), (7, 39, 1), (0, 16, 0)):
        scalars.copy_(torch.tensor([start, key_end, mode], dtype=torch.int32))
        graph.replay()
        ref = block_diffusion_attention_ref(q, k, v, start, key_end, mode, 32, 128 ** -0.5)
        assert (out.float() - ref).abs().max().item() <= 2e-3, (start, key_end, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_on_cuda(dtype: torch.dtype) -> None:
    _cuda()
    from blockpilot.kernels.merge import merge_attention_states, merge_attention_states_ref

    states = tuple(x.cuda() for x in _merge_inputs(7, dtype))
    (out, lse), (want, want_lse) = merge_attention_states(*states), merge_attention_states_ref(*states)
    torch.testing.assert_close(out, want, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=0)


if __name__ == "__main__":
    # The interpreted run of the `interpreted` fixture: TRITON_INTERPRET=1 is already in the environment.
    print(json.dumps(_run_interpreted_cases(sys.argv[1:])))
