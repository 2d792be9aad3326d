"""The fused decode kernels (``blockpilot.kernels.fused``) against the torch ops of ``runtime.cuda_lm`` they replace.

One function, :func:`_cases`, computes every comparison on a device: on the CPU it runs in Triton's interpreter
(this file as a script, ``TRITON_INTERPRET=1``, see ``triton_interp``), on a GPU compiled. Each case reports the
max abs difference between kernel and torch; cache rows that are copied (the window's v, the saved and restored
rows) must be equal exactly.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from triton_interp import run_interpreted

from blockpilot.runtime.cuda_lm import rms_norm
from blockpilot.vla.config import LMConfig
from blockpilot.vla.lm import RotaryEmbedding, rotate_half

DTYPES = ("float32", "bfloat16")


def _rope_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, _ = qkv.shape
    d = cos.shape[-1]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.reshape(b, t, heads, d).transpose(1, 2), k.reshape(b, t, kv_heads, d).transpose(1, 2)
    c, s = cos[:, None], sin[:, None]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v.reshape(b, t, kv_heads, d).transpose(1, 2)


def _diff(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    """Max difference relative to the reference's magnitude (bf16 roundings are relative); ``floor`` bounds the
    denominator from below where a sum cancels (RoPE: the inputs are O(1), so an O(1) floor)."""
    g, r = got.float(), ref.float()
    return float(((g - r).abs() / (r.abs() + floor)).max())


def _cases(device: str) -> dict[str, float]:
    from blockpilot.kernels.fused import add_rms_norm, restore_cache, rope_write_cache, silu_mul

    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}

    def rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    for name in DTYPES:
        dtype = getattr(torch, name)
        # RMSNorm, alone and after the residual add; an odd width (masked lanes) and rows of different scale
        for n in (96, 128):
            x, delta, w = rand(5, n, dtype=dtype, scale=3.0), rand(5, n, dtype=dtype), rand(n, dtype=dtype)
            got, same = add_rms_norm(x.clone(), w, 1e-6)
            out[f"norm-{name}-{n}"] = _diff(got, rms_norm(x, w, 1e-6))
            assert torch.equal(same, x)
            summed = x.clone()
            got, res = add_rms_norm(summed, w, 1e-6, delta)
            out[f"add-norm-{name}-{n}"] = _diff(got, rms_norm(x + delta, w, 1e-6))
            out[f"add-sum-{name}-{n}"] = _diff(res, x + delta)
            assert res.data_ptr() == summed.data_ptr()  # the residual stream is updated in place
        # RoPE + cache write (+ draft save and restore), GQA 4/2, M-RoPE positions, two rows, odd slots
        heads, kv_heads, d, b, t, capacity = 4, 2, 32, 2, 5, 40
        rotary = RotaryEmbedding(LMConfig(vocab_size=64, hidden_size=heads * d, intermediate_size=64, num_layers=1,
                                          num_heads=heads, num_kv_heads=kv_heads, mrope_section=(4, 6, 6)))
        positions = torch.randint(0, 300, (3, b, t), generator=gen).to(device)
        cos, sin = rotary(positions, dtype)
        qkv = rand(b, t, (heads + 2 * kv_heads) * d, dtype=dtype)
        slots = torch.tensor([7, 3, 30, 31, 12], dtype=torch.int64, device=device)
        k_cache, v_cache = rand(b, kv_heads, capacity, d, dtype=dtype), rand(b, kv_heads, capacity, d, dtype=dtype)
        q_ref, k_ref, v_ref = _rope_torch(qkv, cos, sin, heads, kv_heads)
        kc, vc, fused_qkv = k_cache.clone(), v_cache.clone(), qkv.clone()
        saved = rope_write_cache(fused_qkv, cos, sin, kc, vc, slots, heads, kv_heads, save=True)
        assert saved is not None
        q_got = fused_qkv[..., : heads * d].reshape(b, t, heads, d).transpose(1, 2)
        out[f"rope-q-{name}"] = _diff(q_got, q_ref, floor=1.0)
        out[f"rope-k-{name}"] = _diff(kc[:, :, slots], k_ref, floor=1.0)
        assert torch.equal(vc[:, :, slots], v_ref), "v is copied into the cache unchanged"
        assert torch.equal(fused_qkv[..., heads * d:], qkv[..., heads * d:]), "k and v in qkv are left alone"
        assert torch.equal(saved[0], k_cache[:, :, slots]) and torch.equal(saved[1], v_cache[:, :, slots])
        untouched = [s for s in range(capacity) if s not in slots.tolist()]
        assert torch.equal(kc[:, :, untouched], k_cache[:, :, untouched])
        restore_cache(kc, vc, slots, saved)
        assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache), "restore puts the cache back exactly"
        assert rope_write_cache(qkv.clone(), cos, sin, kc, vc, slots, heads, kv_heads) is None
        # SwiGLU from the fused gate/up projection; a width that is not a multiple of the tile
        gate_up = rand(3, 2, 2 * 1100, dtype=dtype, scale=2.0)
        gate, up = gate_up.chunk(2, dim=-1)
        out[f"silu-mul-{name}"] = _diff(silu_mul(gate_up), F.silu(gate) * up)
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    return run_interpreted(__file__)


def _check(diffs: dict[str, float], bf16_ulps: int) -> None:
    """float32 within a few float32 ulps (sqrt, exp and division are the GPU's own); bf16 within ``bf16_ulps``
    relative bf16 ulps (2**-7 each): the same roundings as torch, but a GPU's fast exp can move one by an ulp,
    and the interpreter casts to bf16 by truncation."""
    assert len(diffs) == 2 * (2 * 3 + 3)
    for key, diff in diffs.items():
        if "float32" in key:
            assert diff <= 1e-6, (key, diff)
        else:
            assert diff <= bf16_ulps * 2.0**-7, (key, diff)


def test_fused_kernels_match_torch_in_the_interpreter(interpreted: dict[str, float]) -> None:
    _check(interpreted, bf16_ulps=4)


def test_fused_kernels_refuse_bad_layouts() -> None:
    from blockpilot.kernels.fused import add_rms_norm, rope_write_cache, silu_mul

    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="2 \\* I"):
        silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="qkv must be"):
        rope_write_cache(torch.zeros(1, 2, 10), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 1, 8, 4),
                         torch.zeros(1, 1, 8, 4), torch.zeros(2, dtype=torch.int64), heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="k_cache must be"):
        rope_write_cache(torch.zeros(1, 2, 16), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 8, 4),
                         torch.zeros(1, 2, 8, 4), torch.zeros(2, dtype=torch.int64), heads=2, kv_heads=1)


@pytest.mark.gpu
def test_fused_kernels_match_torch_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    diffs: dict[str, Any] = _cases("cuda")
    _check(diffs, bf16_ulps=2)
    print(json.dumps(diffs))


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_cases("cpu")))
