"""The block-diffusion attention kernel against its torch reference, and the reference against LMStep's math.

The Triton kernel runs on CPU in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
``triton`` is imported: one subprocess runs every case (this file as a script) and reports the max abs
differences as JSON. The CUDA test runs the compiled kernel in fp32, fp16 and bf16 (the interpreter's ``tl.dot``
mishandles bf16, so bf16 is checked on the GPU only). The split-KV path, the log-sum-exp and the state merge are
checked in ``test_kernel_split_kv.py``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from triton_interp import run_interpreted

from blockpilot.kernels.reference import block_diffusion_attention_ref, write_window
from blockpilot.vla.masks import attention_mask
from blockpilot.vla.modes import AttentionMode

# heads, kv_heads, T, capacity, head_dim, start, key_end (None: start + T), mode, block_size, tiles (m, n) or None
CASES: dict[str, dict[str, Any]] = {
    "gqa-causal-multi-tile": dict(h=4, hkv=2, t=40, c=96, d=32, start=7, end=None, mode=0, bs=8, tiles=(16, 16)),
    "gqa-block-multi-tile": dict(h=4, hkv=2, t=40, c=96, d=32, start=7, end=None, mode=1, bs=8, tiles=(16, 16)),
    "gqa-bidirectional-multi-tile": dict(h=4, hkv=2, t=40, c=96, d=32, start=7, end=None, mode=2, bs=8,
                                         tiles=(16, 16)),
    "mha-block-odd-head-dim": dict(h=4, hkv=4, t=5, c=64, d=24, start=30, end=None, mode=1, bs=8, tiles=None),
    "bidirectional-key-end-past-window": dict(h=4, hkv=2, t=12, c=80, d=32, start=20, end=53, mode=2, bs=8,
                                              tiles=(16, 16)),
    "causal-key-end-odd": dict(h=4, hkv=2, t=12, c=80, d=32, start=20, end=37, mode=0, bs=8, tiles=(16, 16)),
    "block-key-end-odd": dict(h=4, hkv=2, t=12, c=80, d=32, start=20, end=45, mode=1, bs=16, tiles=(16, 16)),
    "one-token-at-slot-0": dict(h=2, hkv=1, t=1, c=20, d=16, start=0, end=None, mode=2, bs=4, tiles=None),
    "mha-causal-prefill": dict(h=2, hkv=2, t=33, c=48, d=16, start=0, end=None, mode=0, bs=4, tiles=(16, 32)),
    "device-scalars-strided-q": dict(h=4, hkv=2, t=33, c=128, d=64, start=50, end=None, mode=1, bs=32, tiles=None,
                                     device_scalars=True, strided=True),
    "fp16-block": dict(h=4, hkv=2, t=20, c=64, d=32, start=10, end=None, mode=1, bs=8, tiles=None,
                       dtype="float16"),
}


def _inputs(case: dict[str, Any], seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.get("dtype", "float32"))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    h, hkv, t, c, d = case["h"], case["hkv"], case["t"], case["c"], case["d"]
    q = rand(1, t, h, d).transpose(1, 2) if case.get("strided") else rand(1, h, t, d)
    return {"q": q, "k_new": rand(1, hkv, t, d), "v_new": rand(1, hkv, t, d), "past_k": rand(1, hkv, c, d),
            "past_v": rand(1, hkv, c, d), "start": case["start"],
            "key_end": case["end"] if case["end"] is not None else case["start"] + t, "scale": 1.0 / math.sqrt(d)}


def _run_interpreted_cases() -> dict[str, dict[str, float]]:
    """In the subprocess: each case through the kernels and the reference; max abs diffs."""
    from blockpilot.kernels.block_attention import block_diffusion_attention, write_window_

    results: dict[str, dict[str, float]] = {}
    for i, (name, case) in enumerate(CASES.items()):
        x = _inputs(case, seed=i)
        ref_k, ref_v = write_window(x["past_k"], x["k_new"], x["start"]), write_window(x["past_v"], x["v_new"],
                                                                                         x["start"])
        scalars: tuple[Any, ...] = (x["start"], x["key_end"], case["mode"])
        if case.get("device_scalars"):
            scalars = tuple(torch.tensor([v], dtype=torch.int32) for v in scalars)
        k_cache, v_cache = x["past_k"].clone(), x["past_v"].clone()
        write_window_(k_cache, x["k_new"], scalars[0])
        write_window_(v_cache, x["v_new"], scalars[0])
        tiles = case["tiles"] or (None, None)
        got = block_diffusion_attention(x["q"], k_cache, v_cache, scalars[0], scalars[1], scalars[2], case["bs"],
                                        x["scale"], block_m=tiles[0], block_n=tiles[1])
        ref = block_diffusion_attention_ref(x["q"], ref_k, ref_v, x["start"], x["key_end"], case["mode"], case["bs"],
                                            x["scale"])
        results[name] = {"attn": (got.float() - ref).abs().max().item(),
                         "k_cache": (k_cache.float() - ref_k.float()).abs().max().item(),
                         "v_cache": (v_cache.float() - ref_v.float()).abs().max().item(),
                         "dtype_kept": float(got.dtype == x["q"].dtype), "shape_kept": float(got.shape == x["q"].shape)}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, float]]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_interpreted(interpreted: dict[str, dict[str, float]], name: str) -> None:
    got = interpreted[name]
    tol = 2e-3 if CASES[name].get("dtype") == "float16" else 1e-5
    assert got["attn"] <= tol, got
    assert got["k_cache"] == 0.0 and got["v_cache"] == 0.0, got
    assert got["dtype_kept"] == 1.0 and got["shape_kept"] == 1.0


def _decomposed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, key_end: int,
                mode: int, block_size: int, scale: float) -> torch.Tensor:
    """LMStep's decomposed attention: repeated K/V heads, additive mask from masks.attention_mask, softmax."""
    groups = q.shape[1] // k_cache.shape[1]
    keys = k_cache[:, :, :key_end].repeat_interleave(groups, dim=1)
    values = v_cache[:, :, :key_end].repeat_interleave(groups, dim=1)
    allowed = attention_mask(start + torch.arange(q.shape[2]), torch.arange(key_end), AttentionMode.from_id(mode),
                             block_size)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(torch.matmul(q, keys.transpose(2, 3)) * scale + mask, dim=-1), values)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_lmstep_math(name: str) -> None:
    case = {**CASES[name], "dtype": "float32"}
    x = _inputs(case, seed=100)
    k_cache, v_cache = write_window(x["past_k"], x["k_new"], x["start"]), write_window(x["past_v"], x["v_new"],
                                                                                       x["start"])
    ref = block_diffusion_attention_ref(x["q"], k_cache, v_cache, x["start"], x["key_end"], case["mode"],
                                        case["bs"], x["scale"])
    want = _decomposed(x["q"], k_cache, v_cache, x["start"], x["key_end"], case["mode"], case["bs"], x["scale"])
    assert ref.dtype == torch.float32 and ref.shape == x["q"].shape
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)


def test_reference_takes_one_element_tensors() -> None:
    x = _inputs(CASES["gqa-block-multi-tile"], seed=3)
    k, v = x["past_k"], x["past_v"]
    as_ints = block_diffusion_attention_ref(x["q"], k, v, 7, 47, 1, 8, 0.5)
    as_tensors = block_diffusion_attention_ref(x["q"], k, v, torch.tensor([7], dtype=torch.int32),
                                               torch.tensor(47), torch.tensor([1]), 8, 0.5)
    torch.testing.assert_close(as_ints, as_tensors, atol=0, rtol=0)


def test_write_window_places_rows_and_copies() -> None:
    past = torch.zeros(1, 2, 10, 4)
    new = torch.arange(24, dtype=torch.float32).view(1, 2, 3, 4) + 1
    out = write_window(past, new, 6)
    assert torch.equal(out[:, :, 6:9], new) and not out[:, :, :6].any() and not out[:, :, 9:].any()
    assert not past.any()  # the past is left alone
    with pytest.raises(ValueError, match="outside the cache"):
        write_window(past, new, 8)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"mode": 3}, ValueError, "mode must be"),
    ({"key_end": 97}, ValueError, "key_end"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"k_dtype": torch.float16}, TypeError, "share one"),
    ({"block_m": 24}, ValueError, "power of two"),
    ({"num_splits": 0}, ValueError, "num_splits"),
    ({"num_splits": 3, "workspace_heads": 2}, ValueError, "workspace must be"),
])
def test_launcher_refuses_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    from blockpilot.kernels.block_attention import attention_workspace, block_diffusion_attention

    q, k = torch.zeros(1, 4, 8, 32), torch.zeros(1, 2, 96, 32, dtype=kwargs.pop("k_dtype", torch.float32))
    args = {"start": 0, "key_end": 8, "mode": 1, "block_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        block_diffusion_attention(q, k, k, args["start"], args["key_end"], args["mode"], args["block_size"], 0.5,
                                  block_m=args.get("block_m"), num_splits=args.get("num_splits"),
                                  workspace=attention_workspace(args["workspace_heads"], 8, 32, 3, q.device)
                                  if "workspace_heads" in args else None)


def test_reference_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple"):
        block_diffusion_attention_ref(torch.zeros(1, 3, 2, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8),
                                      0, 2, 0, 4, 1.0)
    with pytest.raises(ValueError, match="mode must be"):
        block_diffusion_attention_ref(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8),
                                      0, 2, 5, 4, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_on_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from blockpilot.kernels.block_attention import block_diffusion_attention, write_window_

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for i, (name, case) in enumerate(CASES.items()):
        x = _inputs({**case, "dtype": str(dtype).removeprefix("torch.")}, seed=i)
        x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        k_cache, v_cache = x["past_k"].clone(), x["past_v"].clone()
        start = torch.tensor([x["start"]], dtype=torch.int32, device="cuda")
        write_window_(k_cache, x["k_new"], start)
        write_window_(v_cache, x["v_new"], start)
        got = block_diffusion_attention(x["q"], k_cache, v_cache, start, x["key_end"], case["mode"], case["bs"],
                                        x["scale"])
        ref = block_diffusion_attention_ref(x["q"], k_cache, v_cache, x["start"], x["key_end"], case["mode"],
                                            case["bs"], x["scale"])
        assert got.dtype == dtype
        assert (got.float() - ref).abs().max().item() <= tol, name
        assert torch.equal(k_cache, write_window(x["past_k"], x["k_new"], x["start"])), name


if __name__ == "__main__":
    # The interpreted run of the `interpreted` fixture: TRITON_INTERPRET=1 is already in the environment.
    print(json.dumps(_run_interpreted_cases()))
