"""Quantized ONNX graphs: modelopt's FP8 export rewritten to standard float8 Q/DQ (checked, built with
TensorRT-RTX for SM 8.9 on CPU, run in ONNX Runtime) and its NVFP4 export checked structurally."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from runtime_fixtures import torch_threads

from blockpilot.export.quant_onnx import (
    FP8_ZERO_POINT,
    check_fp8_structure,
    check_nvfp4_structure,
    export_quantized_onnx,
    ort_agreement,
    rewrite_fp8_qdq,
    summarize_quant_graph,
)
from blockpilot.export.trt_build import PluginGraphError, check_buildable

CAPACITY = 384  # one calibration observation (prompt + answer) is 365 tokens


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    with torch_threads(2):
        yield


# -- the graph rewrite on a hand-made graph ------------------------------------------------------------------


def _trt_fp8_graph(opset: int = 19, *, weight_qdq: bool = True, name: str = "/proj/MatMul") -> Any:
    """x (1, 4, 8) -> modelopt-style trt FP8 Q/DQ -> MatMul with an (8, 3) weight (its own trt Q/DQ)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "proj.weight")
    consts = [helper.make_node("Constant", [], [f"s{i}"], value=helper.make_tensor(f"sv{i}", TensorProto.FLOAT, [],
                                                                                    [v]))
              for i, v in enumerate((0.01, 0.005))]
    nodes = [*consts,
             helper.make_node("TRT_FP8QuantizeLinear", ["x", "s0"], ["xq"], domain="trt", name="xq"),
             helper.make_node("TRT_FP8DequantizeLinear", ["xq", "s0"], ["xd"], domain="trt", name="xd")]
    weight = "proj.weight"
    if weight_qdq:
        nodes += [helper.make_node("TRT_FP8QuantizeLinear", ["proj.weight", "s1"], ["wq"], domain="trt", name="wq"),
                  helper.make_node("TRT_FP8DequantizeLinear", ["wq", "s1"], ["wd"], domain="trt", name="wd")]
        weight = "wd"
    nodes.append(helper.make_node("MatMul", ["xd", weight], ["y"], name=name))
    graph = helper.make_graph(nodes, "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], [w],
                              value_info=[helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 4, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("trt", 1)])


def _fp8_reference(x: np.ndarray, scale: float) -> np.ndarray:
    q = torch.from_numpy(x / np.float32(scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return (q.float() * scale).numpy()


def test_rewrite_fp8_qdq_to_standard_ops(tmp_path: Path) -> None:
    model = _trt_fp8_graph()
    counts = rewrite_fp8_qdq(model)
    assert counts == {"quantize": 2, "dequantize": 2, "value_info_retyped": 1}
    assert {n.op_type for n in model.graph.node} == {"Constant", "QuantizeLinear", "DequantizeLinear", "MatMul"}
    assert all(n.domain == "" for n in model.graph.node)
    assert [o.domain for o in model.opset_import] == [""]  # the trt opset import is gone
    zero = next(i for i in model.graph.initializer if i.name == FP8_ZERO_POINT)
    assert zero.data_type == TensorProto.FLOAT8E4M3FN and list(zero.dims) == []
    assert all(n.input[2] == FP8_ZERO_POINT for n in model.graph.node if "Quantize" in n.op_type)
    assert rewrite_fp8_qdq(model) == {"quantize": 0, "dequantize": 0, "value_info_retyped": 0}  # idempotent
    path = tmp_path / "fp8.onnx"
    onnx.save(model, str(path))
    check_buildable(path, "tensorrt-rtx", "8.9")  # standard ops only: the RTX parser may see it
    report = check_fp8_structure(path)
    assert report["ok"], report["problems"]
    assert report["qdq"] == {"DequantizeLinear:float8e4m3fn": 2, "QuantizeLinear:float8e4m3fn": 2}
    assert report["quantized_weights"] == ["proj.weight"] and report["checker"] == "ok"

    ort = onnxruntime
    x = np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "proj.weight"))
    want = _fp8_reference(x, 0.01) @ _fp8_reference(w, 0.005)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # ORT's float8 Q/DQ == torch's E4M3 rounding


def test_rewrite_needs_opset_19_and_leaves_plain_graphs() -> None:
    with pytest.raises(ValueError, match="opset >= 19"):
        rewrite_fp8_qdq(_trt_fp8_graph(opset=17))
    plain = _trt_fp8_graph()
    del plain.graph.node[:]
    assert rewrite_fp8_qdq(plain) == {"quantize": 0, "dequantize": 0, "value_info_retyped": 0}


def test_check_fp8_structure_flags_problems(tmp_path: Path) -> None:
    raw = tmp_path / "raw.onnx"
    onnx.save(_trt_fp8_graph(), str(raw))  # modelopt's custom nodes, not rewritten
    report = check_fp8_structure(raw)
    assert not report["ok"] and any("custom-domain" in p for p in report["problems"])
    with pytest.raises(PluginGraphError):
        check_buildable(raw, "tensorrt-rtx", "8.9")
    cases = {"half": _trt_fp8_graph(weight_qdq=False), "head": _trt_fp8_graph(name="/lm_head/MatMul")}
    for case, model in cases.items():
        rewrite_fp8_qdq(model)
        path = tmp_path / f"{case}.onnx"
        onnx.save(model, str(path))
        problems = check_fp8_structure(path)["problems"]
        expected = "weight is not QuantizeLinear" if case == "half" else "must stay unquantized"
        assert any(expected in p for p in problems), problems


# -- the shipped model, quantized -----------------------------------------------------------------------------


def _quantized(fmt: str, tmp: Path) -> tuple[Any, Any, dict[str, dict[str, str]]]:
    from blockpilot.calibration import build_calibration_set, synthetic_calibration_source
    from blockpilot.calibration.loop import make_forward_loop
    from blockpilot.demo import SHIPPED_MODEL
    from blockpilot.quant.apply import quantize_model
    from blockpilot.quant.recipes import quantizable_modules, resolve_recipe
    from blockpilot.runtime.plan_types import DecoderSettings
    from blockpilot.runtime.planner import Planner

    planner = Planner.from_checkpoint(SHIPPED_MODEL, decoder=DecoderSettings(name="scaffold"))
    calib = build_calibration_set(synthetic_calibration_source(1, duration_s=8.0), 4, cache_dir=tmp / "calib")
    model = planner.backend.model
    with torch_threads(2):
        report = quantize_model(model, resolve_recipe(fmt).modelopt_config(quantizable_modules(model)),
                                make_forward_loop(planner, calib))
    return planner, calib, report.precision


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fp8")
    planner, calib, precision = _quantized("fp8", tmp)
    result = export_quantized_onnx(planner.backend.model, tmp / "onnx", CAPACITY)
    return {"planner": planner, "calib": calib, "precision": precision, "dir": tmp / "onnx", **result}


def _expected_weights(precision: dict[str, dict[str, str]], prefix: str, graph_prefix: str, fmt: str) -> list[str]:
    return sorted(graph_prefix + name[len(prefix):] + ".weight" for name, roles in precision.items()
                  if name.startswith(prefix) and roles.get("weight") == fmt)


def test_fp8_export_is_standard_qdq(fp8: dict[str, Any]) -> None:
    graphs, precision = fp8["graphs"], fp8["precision"]
    assert fp8["spec"]["opset"] == 19 and set(graphs) == {"lm_step", "vision"}
    for role, prefix, graph_prefix in (("lm_step", "lm.", "lm."), ("vision", "visual.", "tower.")):
        summary = graphs[role]
        want = _expected_weights(precision, prefix, graph_prefix, "fp8_e4m3")
        assert want and summary["rewrite"]["quantize"] == summary["rewrite"]["dequantize"] == 2 * len(want)
        report = check_fp8_structure(summary["file"])
        assert report["ok"], report["problems"]
        assert report["quantized_weights"] == want  # every FP8 Linear: weight and input through Q/DQ
        assert report["qdq"] == {"DequantizeLinear:float8e4m3fn": 2 * len(want),
                                 "QuantizeLinear:float8e4m3fn": 2 * len(want)}
        assert not report["custom_nodes"] and report["checker"] == "ok"
        check_buildable(summary["file"], "tensorrt-rtx", "8.9")
    # lm_head (and the patch embedding, not quantized by the recipe) read their weights directly
    head = [r for r in graphs["lm_step"]["matmuls_fed_by_dq"] if "lm_head" in r["name"]]
    assert not head and len(graphs["lm_step"]["weight_matmuls_without_dq"]) == 1
    assert graphs["vision"]["weight_matmuls_without_dq"] == ["tower.patch_embed.proj.weight"]
    assert not any("embed" in w for w in check_fp8_structure(graphs["lm_step"]["file"])["quantized_weights"])


def test_fp8_engine_builds_for_sm89(fp8: dict[str, Any]) -> None:
    from blockpilot.export.trt_build import TrtUnavailableError, build_engine, load_tensorrt, profiles_from_spec

    try:
        trt = load_tensorrt()
    except TrtUnavailableError as exc:
        pytest.skip(f"no TensorRT / TensorRT-RTX here: {exc}")
    for role in ("lm_step", "vision"):
        engine = Path(fp8["dir"]) / f"{role}.fp8.engine"
        report = build_engine(fp8["graphs"][role]["file"], engine, profiles=profiles_from_spec(fp8["spec"], role),
                              compute_capability="8.9", trt=trt)
        assert engine.is_file() and report.engine_bytes == engine.stat().st_size > 0
        assert report.network_layers > 0


def test_fp8_graph_in_onnx_runtime_matches_fake_quant(fp8: dict[str, Any]) -> None:
    from blockpilot.calibration.loop import calibration_batches

    batch = calibration_batches(fp8["planner"], fp8["calib"])[0]
    result = ort_agreement(fp8["planner"].backend.model, fp8["dir"], batch)
    assert result["tokens"] == batch["input_ids"].shape[1]
    # ORT's float8 rounding matched modelopt's on this model (365/365); allow a little drift elsewhere
    assert result["top1_agreement"] >= 0.95, result
    assert result["vision_max_abs_diff"] < 1e-2 * result["vision_ref_max_abs"], result


def test_nvfp4_export_structure(tmp_path: Path) -> None:
    planner, _, precision = _quantized("nvfp4", tmp_path)
    result = export_quantized_onnx(planner.backend.model, tmp_path / "onnx", 64)
    assert result["spec"]["opset"] == 21  # the blocked DequantizeLinear of NVFP4 activations
    lm = result["graphs"]["lm_step"]
    want = _expected_weights(precision, "lm.", "lm.", "nvfp4")
    report = check_nvfp4_structure(lm["file"])
    assert report["ok"], report["problems"]
    assert report["fp4_weights"] == want
    n = len(want)
    assert (report["fp4_weight_qdq"], report["fp4_dynamic_quantize"], report["block_dequantize"]) == (n, n, n)
    assert report["block_sizes"] == [16]
    assert report["custom_nodes"] == {"trt::TRT_FP4DynamicQuantize": n, "trt::TRT_FP4QDQ": n}
    assert report["qdq"]["DequantizeLinear:float4e2m1"] == n  # the E2M1 values
    assert report["qdq"]["DequantizeLinear:float8e4m3fn"] == n  # their E4M3 block scales
    with pytest.raises(PluginGraphError):
        check_buildable(lm["file"], "tensorrt-rtx", "8.9")  # never handed to the RTX parser
    assert summarize_quant_graph(lm["file"])["checker"] == "ok"
    vision = result["graphs"].get("vision")
    if vision is not None and vision["qdq"]:
        assert check_fp8_structure(vision["file"])["ok"]


def test_fp8_graph_with_fp16_cache_io(fp8: dict[str, Any], tmp_path: Path) -> None:
    """The FP8 LM step with only its cache I/O retyped to float16 (as the export builds fp8 engines): the Q/DQ
    structure is untouched, ONNX Runtime gives the fp32-cache graph's top-1 over two committed steps, and the
    strongly typed network TensorRT(-RTX) parses for SM 8.9 takes and gives HALF for the cache."""
    import json

    from blockpilot.export.cache_io import fp16_cache_io
    from blockpilot.export.fp16_graph import KV_CACHE_IO
    from blockpilot.export.trt_build import TrtUnavailableError, build_engine, load_tensorrt, profiles_from_spec
    from blockpilot.runtime.kv_window import write_rows

    source = Path(fp8["graphs"]["lm_step"]["file"])
    half = source.with_name("lm_step.fp16cache.onnx")
    assert fp16_cache_io(source, half) == {"inputs": 2, "outputs": 2}
    model = onnx.load(str(half))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert all(types[n] == TensorProto.FLOAT16 for n in KV_CACHE_IO) and types["prob"] == TensorProto.FLOAT
    assert check_fp8_structure(half)["qdq"] == check_fp8_structure(source)["qdq"]
    with pytest.raises(ValueError, match="not float32 inputs or outputs"):
        fp16_cache_io(source, tmp_path / "bad.onnx", ("past_k", "position_ids"))
    spec, rng = fp8["spec"], np.random.default_rng(0)
    cache = [int(d) for d in spec["lm_step"]["inputs"][5]["shape"]]
    embeds = rng.standard_normal((1, 24, spec["hidden_size"])).astype(np.float32)
    tops = []
    for path, dtype in ((source, np.float32), (half, np.float16)):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        k, v, top = np.zeros(cache, dtype), np.zeros(cache, dtype), []
        for start, t in ((0, 16), (16, 8)):
            feeds = {"inputs_embeds": embeds[:, start:start + t],
                     "position_ids": np.broadcast_to(np.arange(start, start + t), (3, 1, t)).copy(),
                     "start": np.array(start), "key_end": np.array(start + t), "mode": np.array(0),
                     "past_k": k, "past_v": v}
            top1, _, k_new, v_new = session.run(["top1", "prob", "k_new", "v_new"], feeds)
            assert k_new.dtype == dtype
            write_rows(k, k_new, start)
            write_rows(v, v_new, start)
            top.append(top1)
        tops.append(np.concatenate(top, axis=1))
    assert (tops[0] == tops[1]).mean() >= 0.95
    try:
        trt = load_tensorrt()
    except TrtUnavailableError as exc:
        pytest.skip(f"no TensorRT / TensorRT-RTX here: {exc}")
    report = build_engine(half, tmp_path / "lm.fp8.engine", profiles=profiles_from_spec(spec, "lm_step"),
                          compute_capability="8.9", trt=trt)
    assert report.network is not None
    network = json.loads(report.network.read_text())
    kinds = {t["name"]: t["dtype"] for t in [*network["inputs"], *network["outputs"]]}
    assert {n: kinds[n] for n in KV_CACHE_IO} == dict.fromkeys(KV_CACHE_IO, "HALF") and network["qdq_layers"] > 0
