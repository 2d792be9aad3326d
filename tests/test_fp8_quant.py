"""The FP8 activation quantizer kernels against their torch reference, and ``Fp8Linear.concat``.

The kernels run on CPU in Triton's interpreter (``TRITON_INTERPRET=1`` before ``triton`` is imported): one
subprocess runs the selected tests' cases (this file as a script) and reports JSON: by default one case
(``FAST_CASE``), the scale rule and NaN; the other cases are marked ``slow`` (seconds each in the interpreter).
The interpreter's float32 -> float8 cast rounds wrongly (ties go away from zero, a carry out of the mantissa is
dropped so 126.4 becomes 64, subnormals truncate), so there the kernels write the float32 values they would cast,
which must equal the reference's exactly (and then cast by torch to the reference's bytes); the float8 bytes
themselves are compared on a GPU.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from triton_interp import run_interpreted, selected_params

from blockpilot.kernels.reference import FP8_MAX, quant_scale, quantize_e4m3, quantize_rows_ref
from blockpilot.runtime.cuda_fp8 import Fp8Linear, weight_amax
from blockpilot.runtime.plan_types import PlannerSetupError

E4M3 = torch.float8_e4m3fn

# m, k, dtype, how the scale is set (dynamic, masked: dynamic with a huge padding row masked out by `rows`,
# static, zeros: an all-zero input), pad_to, and the loops' chunk (row amaxes per load) and block_k
CASES: dict[str, dict[str, Any]] = {
    "m1-bf16": dict(m=1, k=64, dtype="bfloat16", scale="dynamic"),
    "m5-bf16-masked": dict(m=5, k=96, dtype="bfloat16", scale="masked"),
    "m16-fp32": dict(m=16, k=64, dtype="float32", scale="dynamic"),
    "m17-fp16-masked-pad1": dict(m=17, k=80, dtype="float16", scale="masked", pad_to=1),
    "m70-bf16-masked-chunks": dict(m=70, k=160, dtype="bfloat16", scale="masked", chunk=16, block_k=64),
    "m70-fp32-chunks": dict(m=70, k=64, dtype="float32", scale="dynamic", chunk=32),
    "m9-bf16-static": dict(m=9, k=128, dtype="bfloat16", scale="static"),
    "m3-fp32-zeros": dict(m=3, k=64, dtype="float32", scale="zeros"),
}
FAST_CASE = "m70-bf16-masked-chunks"  # the default run's representative (masked scale, chunks, block_k, padding)


def _inputs(case: dict[str, Any], seed: int, device: str = "cpu") -> dict[str, Any]:
    """``x`` spread over many binades (subnormal e4m3 values and values past 448 after scaling), and the
    scale arguments."""
    gen = torch.Generator().manual_seed(seed)
    m, k = case["m"], case["k"]
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-12, 4, (m, k), generator=gen).float())
    rows = quant = None
    if case["scale"] == "zeros":
        x.zero_()
    elif case["scale"] == "masked":  # a padding row far larger than the rest: a wrong mask moves the scale
        x[-1] = 1e4
        rows = torch.ones(m, 1)
        rows[-1] = 0.0
    elif case["scale"] == "static":  # an amax below the input's: some values clamp at ±448
        quant = quant_scale(x.abs().amax() * 0.5)
    return {"x": x.to(getattr(torch, case["dtype"])).to(device),
            "rows": None if rows is None else rows.to(device),
            "quant": None if quant is None else quant.to(device)}


def _tuning(case: dict[str, Any]) -> dict[str, Any]:
    return {"pad_to": case.get("pad_to", 16), "chunk": case.get("chunk", 1024), "block_k": case.get("block_k")}


def _ref_prescaled(x: torch.Tensor, quant: torch.Tensor | None, rows: torch.Tensor | None,
                   pad_to: int) -> torch.Tensor:
    """The float32 values the reference casts to e4m3: the padded ``x * quant`` clamped to ±448."""
    if quant is None:
        quant = quant_scale((x.abs() if rows is None else x.abs() * rows).amax())
    pad = (-x.shape[0]) % pad_to
    return (torch.nn.functional.pad(x, (0, 0, 0, pad)).float() * quant).clamp(-FP8_MAX, FP8_MAX)


def _run_interpreted_cases(names: list[str]) -> dict[str, dict[str, bool]]:
    """In the subprocess: each case in ``names`` through the kernels (float32 and float8 outputs) and the
    reference; the scale rule and NaN where ``names`` holds them."""
    from blockpilot.kernels.fp8_quant import _launch, quantize_rows

    results: dict[str, dict[str, bool]] = {}
    for i, (name, case) in enumerate(CASES.items()):
        if name not in names:
            continue
        a = _inputs(case, seed=i)
        tune = _tuning(case)
        ref_q, ref_d = quantize_rows_ref(a["x"], quant=a["quant"], rows=a["rows"], pad_to=tune["pad_to"])
        pre, pre_d = _launch(a["x"], a["quant"], a["rows"], tune["pad_to"], tune["chunk"], tune["block_k"],
                             torch.float32)
        got_q, got_d = quantize_rows(a["x"], quant=a["quant"], rows=a["rows"], **tune)
        want_pre = _ref_prescaled(a["x"], a["quant"], a["rows"], tune["pad_to"])
        m = case["m"]
        results[name] = {
            "prescaled": torch.equal(pre, want_pre),
            "prescaled_bytes": torch.equal(pre.to(E4M3).view(torch.uint8), ref_q.view(torch.uint8)),
            "dequant": torch.equal(pre_d, ref_d) and torch.equal(got_d, ref_d),
            "shapes": got_q.shape == ref_q.shape and got_d.shape == ref_d.shape and got_d.is_contiguous(),
            "fp8": got_q.dtype == E4M3,
            "pad_rows_zero": not got_q[m:].view(torch.uint8).any().item(),
            "zeros_quant_448": case["scale"] != "zeros" or bool((ref_d == 1.0 / 448.0).all().item()),
        }
    if "scale-rule" in names:
        results["scale-rule"] = {"dequant": _scale_rule_holds()}
    if "nan" in names:
        nan = torch.full((3, 16), float("nan"))
        results["nan"] = {"dequant": bool(quantize_rows(nan)[1].isnan().all().item()
                                          and quantize_rows_ref(nan)[1].isnan().all().item())}
    return results


def _scale_rule_holds() -> bool:
    """In the subprocess: the scale rule over many amaxes (448 / amax rounds twice in torch:
    amax.reciprocal() * 448)."""
    from blockpilot.kernels.fp8_quant import quantize_rows

    amaxes = torch.exp2(torch.empty(200).uniform_(-30, 20, generator=torch.Generator().manual_seed(1)))
    rule = []
    for amax in [*amaxes.tolist(), 2.0**-24, 2.0**-23]:
        x = torch.full((1, 16), amax)
        rule.append(torch.equal(quantize_rows(x, pad_to=1, chunk=16)[1], quantize_rows_ref(x, pad_to=1)[1]))
    return all(rule)


@pytest.fixture(scope="module")
def interpreted(request: pytest.FixtureRequest) -> dict[str, dict[str, bool]]:
    """The interpreter's results for the selected tests' cases only."""
    return run_interpreted(__file__, *selected_params(request, "name"))


@pytest.mark.parametrize("name", [*(pytest.param(n, marks=() if n == FAST_CASE else pytest.mark.slow) for n in CASES),
                                  "scale-rule", "nan"])
def test_quantize_rows_matches_reference_interpreted(interpreted: dict[str, dict[str, bool]], name: str) -> None:
    got = interpreted[name]
    assert all(got.values()), got


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_quantize_rows_bytes_on_cuda(name: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from blockpilot.kernels.fp8_quant import quantize_rows

    case = CASES[name]
    a = _inputs(case, seed=7, device="cuda")
    tune = _tuning(case)
    ref_q, ref_d = quantize_rows_ref(a["x"], quant=a["quant"], rows=a["rows"], pad_to=tune["pad_to"])
    got_q, got_d = quantize_rows(a["x"], quant=a["quant"], rows=a["rows"], **tune)
    assert torch.equal(got_q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(got_d, ref_d)


@pytest.mark.gpu
def test_quantize_rows_large_and_in_a_cuda_graph() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from blockpilot.kernels.fp8_quant import quantize_rows

    a = _inputs(dict(m=3000, k=4096, dtype="bfloat16", scale="masked"), seed=3, device="cuda")
    ref_q, ref_d = quantize_rows_ref(a["x"], rows=a["rows"])
    got_q, got_d = quantize_rows(a["x"], rows=a["rows"])  # several default chunks; compiles before the capture
    assert torch.equal(got_q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(got_d, ref_d)
    x = a["x"][:40].clone()
    quantize_rows(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_q, graph_d = quantize_rows(x)
    x.mul_(3.0)
    graph.replay()
    ref_q, ref_d = quantize_rows_ref(x)
    assert torch.equal(graph_q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(graph_d, ref_d)


@pytest.mark.gpu
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_linear_triton_quantizer_matches_torch_ops(per_channel: bool, static: bool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 256, generator=gen).cuda()
    lin = Fp8Linear(w, weight_amax(w, per_channel), torch.randn(96, generator=gen),
                    input_amax=torch.tensor(2.5) if static else None, out_dtype=torch.bfloat16, matmul="scaled_mm")
    for m in (1, 32, 70):
        x = torch.randn(m, 256, generator=gen).to(torch.bfloat16).cuda()
        x[-1] *= 1000.0
        rows = torch.ones(m, 1, device="cuda")
        rows[-1] = 0.0
        for r in (None, rows):
            old = lin._scaled_mm(x, r, triton=False)
            assert torch.equal(lin._scaled_mm(x, r, triton=True), old), (m, r is None)
            assert torch.equal(lin(x[None], r)[0], old), (m, r is None)


def _parts(per_channel: tuple[bool, ...], biases: tuple[bool, ...], input_amax: torch.Tensor | None = None,
           **kwargs: Any) -> list[Fp8Linear]:
    gen = torch.Generator().manual_seed(11)
    parts = []
    for out, pc, has_bias in zip((32, 16, 16), per_channel, biases, strict=True):
        w = torch.randn(out, 64, generator=gen) * torch.rand(out, 1, generator=gen) * 3
        bias = torch.randn(out, generator=gen) if has_bias else None
        parts.append(Fp8Linear(w, weight_amax(w, pc), bias, input_amax=input_amax,
                               **{"out_dtype": torch.float32, "matmul": "dequantize", **kwargs}))
    return parts


@pytest.mark.parametrize("per_channel", [(True,) * 3, (False,) * 3, (False, True, False)],
                         ids=["per-channel", "per-tensor", "mixed"])
@pytest.mark.parametrize("biases", [(True,) * 3, (False,) * 3, (True, False, True)],
                         ids=["bias", "no-bias", "some-bias"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_concat_is_the_parts_side_by_side(per_channel: tuple[bool, ...], biases: tuple[bool, ...],
                                          static: bool) -> None:
    parts = _parts(per_channel, biases, torch.tensor(3.0) if static else None)
    fused = Fp8Linear.concat(parts)
    assert fused.per_channel and fused.weight.dtype == E4M3 and tuple(fused.weight.shape) == (64, 64)
    assert (fused.bias is None) == (not any(biases))
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 64, generator=gen)
    rows = torch.ones(10, 1)
    rows[3] = 0.0
    for r in (None, rows):
        want = torch.cat([p(x, r) for p in parts], dim=-1)
        assert torch.equal(fused(x, r), want)
    assert torch.equal(fused.weight.view(torch.uint8), torch.cat([p.weight for p in parts]).view(torch.uint8))
    assert torch.equal(fused.dequantized_weight(), torch.cat([p.dequantized_weight() for p in parts]))


def test_concat_refuses_parts_that_differ() -> None:
    dynamic = _parts((True,) * 3, (False,) * 3)
    static = _parts((True,) * 3, (False,) * 3, torch.tensor(3.0))
    other_static = _parts((True,) * 3, (False,) * 3, torch.tensor(4.0))
    with pytest.raises(PlannerSetupError, match="activation scale"):
        Fp8Linear.concat([dynamic[0], static[1]])
    with pytest.raises(PlannerSetupError, match="activation scale"):
        Fp8Linear.concat([static[0], other_static[1]])
    Fp8Linear.concat([static[0], static[1]])  # equal static scales are fine
    with pytest.raises(PlannerSetupError, match="out_dtype or matmul"):
        Fp8Linear.concat([dynamic[0], *_parts((True,) * 3, (False,) * 3, out_dtype=torch.bfloat16)[1:]])
    with pytest.raises(PlannerSetupError, match="input features"):
        w = torch.randn(16, 32)
        Fp8Linear.concat([dynamic[0], Fp8Linear(w, weight_amax(w, True), None, input_amax=None,
                                                out_dtype=torch.float32, matmul="dequantize")])
    per_tensor_fp32 = _parts((False,) * 3, (False,) * 3, matmul="scaled_mm")
    with pytest.raises(PlannerSetupError, match="bfloat16"):
        Fp8Linear.concat(per_tensor_fp32)
    with pytest.raises(PlannerSetupError, match="at least one"):
        Fp8Linear.concat([])


if __name__ == "__main__":
    # The interpreted run of the `interpreted` fixture: TRITON_INTERPRET=1 is already in the environment.
    print(json.dumps(_run_interpreted_cases(sys.argv[1:])))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_decode_lm_fuses_qkv_and_gate_up(tiny_lm: Any, per_channel: bool) -> None:
    """q/k/v and gate/up become one FP8 GEMM each: per tensor, one scale over the stacked weight (tensor-wise
    scaled_mm); per channel, each row keeps its own scale. The fused output is the stacked weight's product."""
    from blockpilot.kernels.reference import block_diffusion_attention_ref
    from blockpilot.runtime.cuda_lm import DecodeLM, top1_prob_ref

    lm = tiny_lm(seed=3)
    decode = DecodeLM(lm, device=torch.device("cpu"), dtype=torch.float32, attention=block_diffusion_attention_ref,
                      epilogue=top1_prob_ref, block_size=4, mask_id=60, fp8=True, fp8_per_channel=per_channel)
    layer, attn = decode.layers[0], lm.layers[0].self_attn
    assert isinstance(layer.qkv, Fp8Linear) and isinstance(layer.gate_up, Fp8Linear)
    assert layer.qkv.per_channel is per_channel and layer.gate_up.per_channel is per_channel
    stacked = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    want = stacked.abs().amax(dim=1, keepdim=True) if per_channel else stacked.abs().amax()
    torch.testing.assert_close(layer.qkv.quant_w, quant_scale(want))
    x = torch.randn(3, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach()
    quant_x = quant_scale(x.abs().amax())  # the dynamic per-tensor activation scale
    xq = quantize_e4m3(x, quant_x).float() / quant_x
    torch.testing.assert_close(layer.qkv(x), F.linear(xq, layer.qkv.dequantized_weight(), bias))
