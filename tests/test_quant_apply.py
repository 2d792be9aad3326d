"""Model Optimizer on the CPU: NVFP4 emulation, PTQ with a read-back precision map, save/restore,
and the effective-bits search, on the shipped reference model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import modelopt.torch.quantization as mtq
import numpy as np
import pytest
import torch

from blockpilot.calibration.loop import observation_batches
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.quant.apply import (
    MAP_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    QuantizedCheckpointError,
    QuantReport,
    config_uses_nvfp4,
    format_label,
    load_quantized,
    precision_map,
    quantize_model,
    save_quantized,
)
from blockpilot.quant.auto import auto_quantize_model, weight_bits
from blockpilot.quant.emulation import (
    NVFP4_OP_ARGS,
    compare_with_cuda,
    emulation_active,
    enable_cpu_nvfp4_emulation,
)
from blockpilot.runtime.plan_types import DecoderSettings, Observation
from blockpilot.runtime.planner import Planner

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.is_dir(), reason="the shipped reference model is not checked out")


def nvfp4_op(x: torch.Tensor, amax: torch.Tensor, block: int = 16) -> torch.Tensor:
    return torch.ops.tensorrt.dynamic_block_quantize_op(x, block, amax, *NVFP4_OP_ARGS)


def fresh_planner() -> Planner:
    return Planner.from_checkpoint(SHIPPED_MODEL, decoder=DecoderSettings(name="scaffold"))


def logits_of(planner: Planner) -> torch.Tensor:
    model = planner.backend.model
    ids = torch.arange(8, 72)[None]
    with torch.inference_mode():
        return model.logits(model(ids))


@pytest.fixture(scope="module")
def observations() -> list[Observation]:
    from blockpilot.eval.synthetic import heldout_keyframes, observation

    return [observation(k) for k in heldout_keyframes(1, stride=8)[:4]]


def plans_loop(planner: Planner, observations: list[Observation]) -> Callable[[torch.nn.Module], Any]:
    return lambda _model: [planner.plan(o) for o in observations]


# --- emulation -------------------------------------------------------------------------------------


def test_nvfp4_emulation_is_exact_on_representable_values() -> None:
    enable_cpu_nvfp4_emulation()
    global_scale = 2.0**-10
    amax = torch.tensor(6 * 448 * global_scale)  # global scale exactly 2**-10
    block_scales = [448.0, 1.0, 0.5, 3.5, 10.0, 2.0**-6, 0.125, 208.0]  # all exact in E4M3
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for scale in block_scales:
        values = E2M1_GRID[torch.randint(0, 8, (16,), generator=gen)]
        values[5] = 6.0  # the block's amax maps onto E2M1's maximum, so its scale comes out exact
        signs = torch.where(torch.rand(16, generator=gen) < 0.5, -1.0, 1.0)
        blocks.append(values * signs * scale * global_scale)
    x = torch.stack(blocks).reshape(2, 64)
    assert torch.equal(nvfp4_op(x, amax), x)


@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 37), (40,)])
def test_nvfp4_emulation_lands_on_the_grid_within_half_a_step(shape: tuple[int, ...]) -> None:
    enable_cpu_nvfp4_emulation()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    amax = x.abs().amax()
    y = nvfp4_op(x, amax)
    assert y.shape == x.shape and y.dtype == x.dtype
    global_scale = amax / (6 * 448)
    width = shape[-1]
    pad = (-width) % 16
    xb = torch.nn.functional.pad(x.reshape(-1, width), (0, pad)).reshape(-1, 16)
    yb = torch.nn.functional.pad(y.reshape(-1, width), (0, pad)).reshape(-1, 16)
    fp8 = (xb.abs().amax(-1, keepdim=True) / (6 * global_scale)).to(torch.float8_e4m3fn).float()
    scale = fp8 * global_scale
    q = yb.abs() / scale
    assert torch.allclose(q, E2M1_GRID[(q[..., None] - E2M1_GRID).abs().argmin(-1)], atol=1e-5)
    a = xb.abs() / scale
    half_step = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))
    assert bool(((yb - xb).abs() <= half_step * scale * (1 + 1e-5)).all())
    assert torch.equal(torch.sign(yb)[yb != 0], torch.sign(xb)[yb != 0])
    bf16 = nvfp4_op(x.bfloat16(), amax)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == x.shape


def test_emulation_is_idempotent_cpu_only_and_defers_other_formats() -> None:
    from modelopt.torch.quantization import tensor_quant

    enable_cpu_nvfp4_emulation()
    enable_cpu_nvfp4_emulation()
    assert emulation_active()
    dump = torch._C._dispatch_dump("tensorrt::dynamic_block_quantize_op")
    cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
    cuda = [line for line in dump.splitlines() if line.startswith("CUDA")]
    assert len(cpu) == 1 and "emulation.py" in cpu[0]
    assert all("emulation.py" not in line for line in cuda)
    x = torch.randn(4, 32)
    int4 = (4, 0, 8, 4)  # not NVFP4: modelopt's own implementation answers (and refuses it)
    with pytest.raises(NotImplementedError):
        tensor_quant._dynamic_block_quantize_impl(x, 16, x.abs().amax(), *int4)
    with pytest.raises(NotImplementedError):
        torch.ops.tensorrt.dynamic_block_quantize_op(x, 16, x.abs().amax(), *int4)
    no_amax = torch.ops.tensorrt.dynamic_block_quantize_op(x, 16, None, *NVFP4_OP_ARGS)
    assert torch.equal(no_amax, nvfp4_op(x, x.abs().amax()))


def test_mtq_nvfp4_runs_on_cpu_with_a_padded_last_dim() -> None:
    enable_cpu_nvfp4_emulation()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    data = torch.randn(8, 40)
    reference = model(data)
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop=lambda m: m(data))
    with torch.no_grad():
        out = model(data)
    assert precision_map(model)["0"] == {"input": "nvfp4", "weight": "nvfp4"}
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert (out - reference).abs().max() < 0.25 * reference.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_emulation_matches_the_cuda_kernel() -> None:
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    diff = compare_with_cuda(x)
    assert diff is not None and diff <= 1e-5 * float(x.abs().max())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_compare_with_cuda_without_a_gpu() -> None:
    assert compare_with_cuda(torch.randn(4, 16)) is None


# --- labels ----------------------------------------------------------------------------------------


def test_format_labels_and_bits() -> None:
    assert format_label((4, 3)) == "fp8_e4m3"
    assert format_label((2, 1), {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}) == "nvfp4"
    assert format_label((2, 1), {-1: 32, "type": "dynamic", "scale_bits": (4, 3)}) == "nvfp4_b32"  # W4A8_NVFP4_FP8
    assert format_label([2, 1], {-1: 32, "type": "dynamic", "scale_bits": [8, 0]}) == "mxfp4"
    assert format_label((4, 3), {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}) == "mxfp8"
    assert format_label(8) == "int8" and format_label(4, {-1: 128}) == "int4"
    assert config_uses_nvfp4(mtq.NVFP4_DEFAULT_CFG) and not config_uses_nvfp4(mtq.FP8_DEFAULT_CFG)


# --- PTQ, save and restore -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_planner(observations: list[Observation]) -> tuple[Planner, QuantReport]:
    planner = fresh_planner()
    report = quantize_model(planner.backend.model, mtq.FP8_DEFAULT_CFG, plans_loop(planner, observations))
    return planner, report


def test_fp8_on_the_shipped_model(fp8_planner: tuple[Planner, QuantReport],
                                  observations: list[Observation]) -> None:
    planner, report = fp8_planner
    assert planner.plan(observations[0]).ok
    assert report.precision["lm.layers.0.self_attn.q_proj"] == {"input": "fp8_e4m3", "weight": "fp8_e4m3"}
    q_proj = planner.backend.model.lm.layers[0].self_attn.q_proj
    assert q_proj.weight_quantizer.is_enabled and q_proj.weight_quantizer.amax is not None
    assert "lm.lm_head" not in report.precision and not planner.backend.model.lm.lm_head.weight_quantizer.is_enabled
    assert not any(name.startswith("visual") for name in report.precision)
    assert report.quantized_modules == 28 and not report.emulated  # 4 layers x 7 linears
    info = json.loads(json.dumps(report.to_dict()))
    assert info["formats"] == {"input": {"fp8_e4m3": 28}, "weight": {"fp8_e4m3": 28}}
    assert info["modelopt_version"] == "0.47.0" and info["config"]["algorithm"] == "max"


def test_save_then_load_gives_identical_logits_and_plans(fp8_planner: tuple[Planner, QuantReport],
                                                          observations: list[Observation], tmp_path: Path) -> None:
    planner, report = fp8_planner
    out = save_quantized(planner.backend.model, tmp_path / "fp8", report, extra={"checkpoint": str(SHIPPED_MODEL)})
    assert sorted(p.name for p in out.iterdir()) == sorted([MAP_FILE, STATE_FILE, WEIGHTS_FILE])
    info = json.loads((out / MAP_FILE).read_text())
    assert info["checkpoint"] == str(SHIPPED_MODEL) and info["precision"] == report.precision
    restored = fresh_planner()
    load_quantized(restored.backend.model, out)
    assert precision_map(restored.backend.model) == report.precision
    assert torch.equal(logits_of(restored), logits_of(planner))
    assert not torch.equal(logits_of(restored), logits_of(fresh_planner()))  # it is quantized
    assert np.array_equal(restored.plan(observations[0]).tokens, planner.plan(observations[0]).tokens)
    with pytest.raises(ValueError, match="overwrite"):
        save_quantized(planner.backend.model, tmp_path / "clash", report, extra={"precision": {}})


def test_load_errors_name_the_file(fp8_planner: tuple[Planner, QuantReport], tmp_path: Path,
                                   tiny_lm: Callable[..., torch.nn.Module]) -> None:
    planner, report = fp8_planner
    out = save_quantized(planner.backend.model, tmp_path / "q", report)
    with pytest.raises(QuantizedCheckpointError, match="already holds quantizers"):
        load_quantized(planner.backend.model, out)
    with pytest.raises(QuantizedCheckpointError, match=f"{STATE_FILE}: does not restore onto this model"):
        load_quantized(tiny_lm(), out)  # another architecture
    torch.save({"lm.norm.weight": torch.ones(3)}, out / WEIGHTS_FILE)
    with pytest.raises(QuantizedCheckpointError, match=f"{WEIGHTS_FILE}: does not match the model"):
        load_quantized(fresh_planner().backend.model, out)
    (out / WEIGHTS_FILE).write_bytes(b"not a torch file")
    with pytest.raises(QuantizedCheckpointError, match=f"{WEIGHTS_FILE}: unreadable"):
        load_quantized(fresh_planner().backend.model, out)
    (out / STATE_FILE).unlink()
    with pytest.raises(QuantizedCheckpointError, match=f"{STATE_FILE}: missing"):
        load_quantized(fresh_planner().backend.model, out)
    (out / MAP_FILE).write_text("{")
    with pytest.raises(QuantizedCheckpointError, match=f"{MAP_FILE}: unreadable"):
        load_quantized(fresh_planner().backend.model, out)
    with pytest.raises(QuantizedCheckpointError, match=f"{MAP_FILE}: missing"):
        load_quantized(fresh_planner().backend.model, tmp_path / "nowhere")


def test_nvfp4_emulated_on_the_shipped_model(observations: list[Observation], tmp_path: Path) -> None:
    planner = fresh_planner()
    report = quantize_model(planner.backend.model, mtq.NVFP4_DEFAULT_CFG, plans_loop(planner, observations[:2]))
    assert report.emulated and emulation_active()
    assert report.to_dict()["emulation"] == "NVFP4 emulated on CPU"
    assert report.precision["lm.layers.3.mlp.down_proj"] == {"input": "nvfp4", "weight": "nvfp4"}
    assert "lm.lm_head" not in report.precision and report.quantized_modules == 28
    plan = planner.plan(observations[0])
    assert plan.tokens.shape[1] > 0 and plan.text
    out = save_quantized(planner.backend.model, tmp_path / "nvfp4", report)
    restored = fresh_planner()
    load_quantized(restored.backend.model, out)
    assert torch.equal(logits_of(restored), logits_of(planner))


# --- effective-bits search -------------------------------------------------------------------------


def test_auto_quantize_meets_and_uses_the_budget(observations: list[Observation], tmp_path: Path) -> None:
    planner = fresh_planner()
    batches = observation_batches(planner, observations[:2])
    result = auto_quantize_model(planner.backend.model, formats=[mtq.NVFP4_DEFAULT_CFG, "FP8_DEFAULT_CFG"],
                                 effective_bits=6.0, batches=batches)
    assert 4.5 < result.effective_bits <= 6.0 + 1e-6
    assert result.effective_bits == pytest.approx(result.modelopt_effective_bits, abs=1e-9)
    assert result.effective_bits_all > result.effective_bits  # vision tower and head stay at 16 bits
    chosen = {f for name, f in result.chosen.items() if name.startswith("lm.layers")}
    assert chosen == {"nvfp4", "fp8_e4m3"} and result.emulated
    assert "lm.lm_head" in result.disabled and result.chosen["lm.lm_head"] == "none"
    q = planner.backend.model.lm.layers[0].self_attn
    assert len({result.chosen[f"lm.layers.0.self_attn.{p}_proj"] for p in "qkv"}) == 1  # fused q/k/v share
    assert weight_bits(q.q_proj.weight_quantizer) in (4.5, 8.0)
    assert result.search["is_satisfied"] and json.dumps(result.to_dict())
    assert planner.plan(observations[0]).tokens.shape[1] > 0
    report = QuantReport(result.precision, {"auto_quantize": result.to_dict()["search"]["groups"]}, result.emulated,
                         "0.47.0")
    restored = fresh_planner()
    load_quantized(restored.backend.model, save_quantized(planner.backend.model, tmp_path / "auto", report))
    assert torch.equal(logits_of(restored), logits_of(planner))
