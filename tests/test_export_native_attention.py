"""The native-attention route: lm_step's decomposed attention as ONNX ``Attention`` (opset 23), checked in
ONNX Runtime against the decomposed graph and built with TensorRT(-RTX) for CC 8.9 in fp32 and fp16."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from blockpilot.export.fp16_graph import to_fp16_graph
from blockpilot.export.native_attention import (
    NATIVE_OPSET,
    attention_layer_types,
    build_native_engine,
    to_native_attention,
)
from blockpilot.export.onnx_graphs import export_onnx
from blockpilot.export.trt_build import (
    EngineBuildError,
    TrtUnavailableError,
    build_engine,
    load_tensorrt,
    profiles_from_spec,
)
from blockpilot.vla.loader import load_model

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"
CAPACITY = 256


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("native")
    spec = export_onnx(load_model(REFERENCE), out, capacity=CAPACITY)
    return out, spec


@pytest.fixture(scope="module")
def native(exported: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    out, _ = exported
    path = out / "lm_native.onnx"
    return path, to_native_attention(out / "lm_step.onnx", path)


def _trt_or_skip() -> None:
    """TensorRT-RTX installs with the dev extra; only a machine with no TensorRT of any kind skips."""
    try:
        load_tensorrt()
    except TrtUnavailableError as exc:
        pytest.skip(f"no TensorRT / TensorRT-RTX here: {exc}")


def _feeds(spec: dict[str, Any], mode: int, start: int, t: int, seed: int, zero_cache: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    cache = tuple(spec["lm_step"]["inputs"][5]["shape"])
    past = (np.zeros(cache, np.float32), np.zeros(cache, np.float32)) if zero_cache else \
        tuple(rng.standard_normal(cache).astype(np.float32) for _ in range(2))
    pos = np.broadcast_to(np.arange(start, start + t), (3, 1, t)).astype(np.int64).copy()
    return {"inputs_embeds": rng.standard_normal((1, t, spec["hidden_size"])).astype(np.float32),
            "position_ids": pos, "start": np.array(start, np.int64), "key_end": np.array(start + t, np.int64),
            "mode": np.array(mode, np.int64), "past_k": past[0], "past_v": past[1]}


def test_rewrite_makes_one_attention_node_per_layer(exported: tuple[Path, dict[str, Any]],
                                                    native: tuple[Path, dict[str, Any]]) -> None:
    out, _ = exported
    path, report = native
    layers = json.loads((REFERENCE / "config.json").read_text())["text_config"]["num_hidden_layers"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert report["attention_nodes"] == layers == ops.count("Attention")
    assert ops.count("Softmax") == 1  # only the top-1 probability head is left
    assert ops.count("Tile") == 0  # the GQA head repeats are gone: the op groups the heads itself
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {NATIVE_OPSET}
    assert all(layer["boolean_mask"] and layer["grouped_kv"] for layer in report["per_layer"])
    assert report["nodes_after"] < report["nodes_before"] == len(onnx.load(str(out / "lm_step.onnx")).graph.node)
    # The graph's I/O is unchanged, so the export's spec and the backend still apply.
    before = onnx.load(str(out / "lm_step.onnx"))
    assert [i.name for i in model.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in before.graph.output]


def test_rewrite_refuses_a_graph_without_attention(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "relu.onnx"))
    with pytest.raises(ValueError, match="no MatMul"):
        to_native_attention(tmp_path / "relu.onnx", tmp_path / "out.onnx")


@pytest.mark.parametrize(("mode", "start", "t", "zero_cache"),
                         [(0, 0, 9, True), (0, 37, 12, False), (1, 40, 16, False), (2, 64, 8, False),
                          (2, 0, 32, True)])
def test_onnxruntime_parity(exported: tuple[Path, dict[str, Any]], native: tuple[Path, dict[str, Any]],
                            mode: int, start: int, t: int, zero_cache: bool) -> None:
    ort = onnxruntime
    out, spec = exported
    path, _ = native
    feeds = _feeds(spec, mode, start, t, seed=mode * 100 + start, zero_cache=zero_cache)
    ref = ort.InferenceSession(str(out / "lm_step.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-4)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5)
    np.testing.assert_allclose(got[3], ref[3], atol=1e-5)


def test_typed_slot_inputs_survive_the_rewrite_and_match_on_onnxruntime(
        exported: tuple[Path, dict[str, Any]], native: tuple[Path, dict[str, Any]]) -> None:
    """The typed-slot tables are graph inputs with a default initializer (onnx-graphsurgeon would turn them
    into constants): the rewritten graph keeps them as inputs, and an override masks its logits exactly as
    it masks the decomposed graph's."""
    out, spec = exported
    path, _ = native
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    assert inputs[-2:] == ["allowed_table", "token_class"]
    assert {"allowed_table", "token_class"} <= {t.name for t in model.graph.initializer}
    t = 12
    feeds = _feeds(spec, 1, 20, t, seed=11, zero_cache=False)
    rng = np.random.default_rng(12)
    vocab = model.graph.input[-2].type.tensor_type.shape.dim[1].dim_value
    feeds["allowed_table"] = np.stack([np.ones(vocab, bool), rng.random(vocab) < 0.05])
    feeds["token_class"] = rng.integers(0, 2, size=(1, t)).astype(np.int64)
    runs = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
            for p in (out / "lm_step.onnx", path)]
    np.testing.assert_array_equal(runs[1][0], runs[0][0])
    assert np.all(feeds["allowed_table"][feeds["token_class"][0], runs[1][0][0]])  # every top-1 id is allowed
    np.testing.assert_allclose(runs[1][1], runs[0][1], atol=1e-4)


def test_ungrouped_variant_matches_too(exported: tuple[Path, dict[str, Any]]) -> None:
    ort = onnxruntime
    out, spec = exported
    report = to_native_attention(out / "lm_step.onnx", out / "lm_native_mha.onnx", gqa=False)
    assert not any(layer["grouped_kv"] for layer in report["per_layer"])
    feeds = _feeds(spec, 1, 20, 12, seed=7, zero_cache=False)
    ref = ort.InferenceSession(str(out / "lm_step.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out / "lm_native_mha.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-4)


def test_tensorrt_parses_attention_layers(native: tuple[Path, dict[str, Any]]) -> None:
    _trt_or_skip()
    path, report = native
    types = attention_layer_types(path)
    assert types.get("ATTENTION_INPUT") == types.get("ATTENTION_OUTPUT") == report["attention_nodes"]
    assert types.get("SOFTMAX") == 1


def test_tensorrt_fp32_needs_decomposable_attention(exported: tuple[Path, dict[str, Any]],
                                                    native: tuple[Path, dict[str, Any]]) -> None:
    _trt_or_skip()
    out, spec = exported
    path, report = native
    profiles = profiles_from_spec(spec, "lm_step")
    # No fused fp32 attention kernel: the plain build refuses, the decomposable one builds.
    with pytest.raises(EngineBuildError):
        build_engine(path, out / "plain32.engine", profiles=profiles, compute_capability="8.9")
    built = build_native_engine(path, out / "native32.engine", profiles=profiles, compute_capability="8.9")
    assert built.attention_layers == report["attention_nodes"] and built.decomposable
    assert built.compute_capability == "8.9" and built.engine_bytes > 0 and built.engine.is_file()


def test_tensorrt_fp16_builds_with_fused_attention(exported: tuple[Path, dict[str, Any]],
                                                   native: tuple[Path, dict[str, Any]]) -> None:
    _trt_or_skip()
    out, spec = exported
    path, report = native
    to_fp16_graph(path, out / "lm_native_fp16.onnx")
    profiles = profiles_from_spec(spec, "lm_step")
    built = build_engine(out / "lm_native_fp16.onnx", out / "native16.engine", profiles=profiles,
                         compute_capability="8.9")
    assert built.engine_bytes > 0 and built.compute_capability == "8.9"
    assert attention_layer_types(out / "lm_native_fp16.onnx").get("ATTENTION_INPUT") == report["attention_nodes"]


def test_fp16_cache_io_keeps_the_fused_attention(exported: tuple[Path, dict[str, Any]],
                                                 native: tuple[Path, dict[str, Any]]) -> None:
    """As the export converts it (native rewrite of the fp32 graph, then fp16 with the cache I/O fp16): every
    layer is still one Attention node, the fused-only build (not decomposable) succeeds, and the network's cache
    tensors are HALF."""
    from blockpilot.export.fp16_graph import KV_CACHE_IO

    _trt_or_skip()
    out, spec = exported
    path, report = native
    half = out / "lm_native_fp16cache.onnx"
    to_fp16_graph(path, half, fp16_io=KV_CACHE_IO)
    model = onnx.load(str(half))
    assert sum(n.op_type == "Attention" for n in model.graph.node) == report["attention_nodes"]
    built = build_native_engine(half, out / "native16cache.engine", profiles=profiles_from_spec(spec, "lm_step"),
                                compute_capability="8.9", decomposable=False)
    assert built.attention_layers == report["attention_nodes"] and built.build is not None
    network = json.loads(Path(str(built.build.network)).read_text())
    kinds = {t["name"]: t["dtype"] for t in [*network["inputs"], *network["outputs"]]}
    assert {n: kinds[n] for n in KV_CACHE_IO} == dict.fromkeys(KV_CACHE_IO, "HALF")
