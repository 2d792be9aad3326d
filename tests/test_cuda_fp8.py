"""FP8 weights of the CUDA backend from a real modelopt-quantized reference model, checked on the CPU.

The reference model is quantized by modelopt (the project's fp8 recipe: per-tensor e4m3 weights and calibrated
per-tensor inputs; and the same with per-output-channel weight scales). Every LM linear's scales are read back by
:func:`blockpilot.runtime.cuda_fp8.modelopt_scales`; the dequantize path (what the scaled matmul computes, on
float32 operands) must give modelopt's fake-quant output exactly, and ``torch._scaled_mm`` (which the CPU build
of torch also runs) the same product up to its output rounding. Through the whole LM, the backend's float32 FP8
forward stays with the fake-quantized torch backend: a 1e-7 difference in attention can move an activation
across an FP8 rounding boundary, so the model-level check is agreement, not identity.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from runtime_fixtures import image_prompt
from torch import nn

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.kernels.reference import quant_scale
from blockpilot.quant.apply import quantize_model
from blockpilot.quant.recipes import quantizable_modules, resolve_recipe
from blockpilot.runtime.cuda_backend import CudaBackend
from blockpilot.runtime.cuda_fp8 import Fp8Linear, modelopt_scales
from blockpilot.runtime.cuda_lm import LINEARS
from blockpilot.runtime.plan_types import PlannerSetupError
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(per_channel: bool) -> VLAModel:
    model = load_model(SHIPPED_MODEL)
    tokenizer = load_tokenizer(SHIPPED_MODEL, model.config)
    config = copy.deepcopy(resolve_recipe("fp8").modelopt_config(quantizable_modules(model)))
    if per_channel:
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "lm.layers.*.weight_quantizer":
                entry["cfg"]["axis"] = 0
    prompts = [image_prompt(tokenizer, text_tokens=30, seed=s) for s in range(2)]

    def calibrate(m: nn.Module) -> None:  # prefill and a bidirectional draft, as plans run them
        backend = TorchBackend(m, 128)  # type: ignore[arg-type]
        for p in prompts:
            backend.prefill(p)
            backend.step(np.arange(40, 72)[None], len(p), mode=AttentionMode.BIDIRECTIONAL, write_kv=False)

    quantize_model(model, config, calibrate)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def quantized(request: pytest.FixtureRequest) -> tuple[VLAModel, bool]:
    return _quantized(request.param), request.param


def _linears(model: VLAModel) -> Iterator[tuple[str, nn.Linear]]:
    for i, layer in enumerate(model.lm.layers):
        for name in LINEARS:
            module = layer.get_submodule(name)
            assert isinstance(module, nn.Linear)
            yield f"lm.layers.{i}.{name}", module


def test_scales_come_from_the_modelopt_quantizers(quantized: tuple[VLAModel, bool]) -> None:
    model, per_channel = quantized
    for name, module in _linears(model):
        scales = modelopt_scales(name, module)
        assert scales is not None and scales.input_amax is not None, name
        assert scales.per_channel is per_channel
        want_shape = (module.out_features, 1) if per_channel else ()
        assert tuple(scales.weight_amax.shape) == want_shape
        amax: Any = module.weight_quantizer.amax
        torch.testing.assert_close(scales.weight_amax, amax.float().reshape(want_shape), atol=0, rtol=0)
        # modelopt's max calibration: amax is the weight's max-abs (per row or overall)
        w = module.weight.detach().abs()
        torch.testing.assert_close(scales.weight_amax, w.amax(1, keepdim=True) if per_channel else w.amax())
    assert modelopt_scales("lm.lm_head", model.lm.lm_head) is None  # the head is left unquantized


def test_dequantize_path_equals_modelopt_fake_quant(quantized: tuple[VLAModel, bool]) -> None:
    model, _ = quantized
    gen = torch.Generator().manual_seed(0)
    for name, module in _linears(model):
        fp8 = Fp8Linear.from_linear(name, module, device=torch.device("cpu"), out_dtype=torch.float32,
                                    activation_scale="static")
        assert fp8.matmul == "dequantize" and fp8.weight.dtype == torch.float8_e4m3fn
        x = torch.randn(2, 9, module.in_features, generator=gen) * 2
        with torch.no_grad():
            want = module(x)  # modelopt's QuantLinear: fake-quantized input and weight
        assert torch.equal(fp8(x), want), name
        # torch._scaled_mm on the CPU: the GPU path's operand layout and scales, same product
        mm = Fp8Linear.from_linear(name, module, device=torch.device("cpu"), out_dtype=torch.bfloat16,
                                   activation_scale="static", matmul="scaled_mm")
        x_bf16 = x.to(torch.bfloat16)
        with torch.no_grad():
            want = module(x_bf16.float())
        got = mm(x_bf16)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, atol=4e-3 * float(want.abs().max()), rtol=1e-2)


def test_fp8_forward_tracks_the_fake_quantized_model(quantized: tuple[VLAModel, bool]) -> None:
    model, _ = quantized
    tokenizer = load_tokenizer(SHIPPED_MODEL, model.config)
    prompt = image_prompt(tokenizer, text_tokens=30, seed=5)
    ref = TorchBackend(model, 256)
    ours = CudaBackend(model, 256, device="cpu", precision="fp8", compute_dtype=torch.float32,
                       activation_scale="static")
    assert ours.precision == "fp8"
    assert np.array_equal(ref.prefill(prompt).top1, ours.prefill(prompt).top1)
    agree, diffs = [], []
    tokens = np.arange(40, 72)[None]
    for mode in AttentionMode:
        a = ref.step(tokens, len(prompt), mode=mode, write_kv=False)
        b = ours.step(tokens, len(prompt), mode=mode, write_kv=False)
        agree.append(float((a.top1 == b.top1).mean()))
        diffs.append(float(np.median(np.abs(a.prob - b.prob))))
    assert np.mean(agree) >= 0.9 and max(diffs) < 1e-3, (agree, diffs)


def test_weights_without_quantizers_scale_themselves() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 32, generator=gen) * 0.1)
        linear.bias.zero_()
        linear.weight[3] *= 1e4  # one loud channel: one scale pushes the quiet ones into e4m3's subnormals
    per_tensor = Fp8Linear.from_linear("l", linear, device=torch.device("cpu"), out_dtype=torch.float32,
                                       per_channel=False)
    per_channel = Fp8Linear.from_linear("l", linear, device=torch.device("cpu"), out_dtype=torch.float32)
    w = linear.weight.detach()
    quiet = torch.arange(48) != 3
    err_t = ((per_tensor.dequantized_weight() - w).abs() / w.abs())[quiet].mean()
    err_c = ((per_channel.dequantized_weight() - w).abs() / w.abs())[quiet].mean()
    assert err_c < 0.05 < err_t
    torch.testing.assert_close(per_channel.quant_w.reshape(-1), quant_scale(w.abs().amax(1)))
    x = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        want = linear(x)
    # dynamic activation scale: FP8's ~6% relative step on inputs and weights, summed over 32 products
    torch.testing.assert_close(per_channel(x)[:, quiet], want[:, quiet], atol=0.15, rtol=0.1)
    with pytest.raises(PlannerSetupError, match="static FP8 activation"):
        Fp8Linear.from_linear("l", linear, device=torch.device("cpu"), out_dtype=torch.float32,
                              activation_scale="static")


class _Quantizer(nn.Module):
    def __init__(self, num_bits: Any, amax: torch.Tensor | None = None, block_sizes: Any = None) -> None:
        super().__init__()
        self.num_bits, self.block_sizes, self.is_enabled = num_bits, block_sizes, True
        self.amax = amax


@pytest.mark.parametrize(("quantizers", "match"), [
    ({"weight_quantizer": _Quantizer((2, 1), torch.tensor(1.0), {-1: 16})}, "FP8 \\(e4m3\\) weight quantizers only"),
    ({"weight_quantizer": _Quantizer(8, torch.tensor(1.0))}, "FP8 \\(e4m3\\) weight quantizers only"),
    ({"weight_quantizer": _Quantizer((4, 3))}, "not calibrated"),
    ({"weight_quantizer": _Quantizer((4, 3), torch.tensor(1.0)), "output_quantizer": _Quantizer((4, 3))},
     "FP8 KV cache"),
    ({"weight_quantizer": _Quantizer((4, 3), torch.ones(5))}, "neither per tensor"),
])
def test_formats_the_backend_cannot_run_are_refused(quantizers: dict[str, nn.Module], match: str) -> None:
    linear = nn.Linear(32, 16)
    for attr, q in quantizers.items():
        setattr(linear, attr, q)
    with pytest.raises(PlannerSetupError, match=match):
        modelopt_scales("lm.layers.0.mlp.up_proj", linear)


def test_padding_never_moves_a_dynamic_scale() -> None:
    """A padded step (5 tokens in an 8-wide bucket) answers as the same step at its own width: the padding rows
    are left out of every dynamic activation scale."""
    model = load_model(SHIPPED_MODEL)
    tokenizer = load_tokenizer(SHIPPED_MODEL, model.config)
    prompt = image_prompt(tokenizer, text_tokens=30, seed=2)
    kw: dict[str, Any] = {"device": "cpu", "precision": "fp8", "compute_dtype": torch.float32}
    padded, exact = CudaBackend(model, 256, **kw), CudaBackend(model, 256, buckets=(), **kw)
    padded.prefill(prompt)
    exact.prefill(prompt)
    tokens = np.random.default_rng(0).integers(30, 700, (1, 5))
    for mode in AttentionMode:
        a = padded.step(tokens, len(prompt), mode=mode, write_kv=False)
        b = exact.step(tokens, len(prompt), mode=mode, write_kv=False)
        assert np.array_equal(a.top1, b.top1) and float(np.abs(a.prob - b.prob).max()) < 1e-5
