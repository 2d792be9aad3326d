"""TensorRT(-RTX) ahead-of-time engine builds of the exported graphs (CPU only, for compute capability 8.9)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import onnx
import pytest

from blockpilot.export import trt_build
from blockpilot.export.fp16_graph import to_fp16_graph
from blockpilot.export.trt_build import (
    PluginGraphError,
    TensorRT,
    TrtUnavailableError,
    build_engine,
    load_tensorrt,
    profiles_from_spec,
)

CAPACITY = 128


def _trt_or_skip() -> TensorRT:
    try:
        return load_tensorrt()
    except TrtUnavailableError as exc:
        pytest.skip(f"no TensorRT / TensorRT-RTX here: {exc}")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    _trt_or_skip()
    from blockpilot.export.onnx_graphs import export_onnx
    from blockpilot.vla.loader import load_model

    out = tmp_path_factory.mktemp("onnx")
    spec = export_onnx(load_model("models/reference"), out, capacity=CAPACITY)
    return out, spec


def _check_report(report: trt_build.BuildReport, engine: Path, trt: TensorRT) -> None:
    assert engine.is_file() and engine.stat().st_size > 0
    assert report.engine == engine and report.engine_bytes == engine.stat().st_size
    assert report.seconds > 0 and report.network_layers > 0
    assert report.flavor == trt.flavor and report.version == trt.version
    if trt.is_rtx:
        assert report.compute_capability == "8.9"
    assert (report.inspector is not None) == (report.inspector_note == "written")
    if report.inspector is not None:
        assert report.inspector.name == engine.name + ".layers.json" and report.inspector.is_file()
    else:
        assert "CUDA" in report.inspector_note
    as_dict = report.to_dict()
    assert as_dict["engine"] == str(engine) and as_dict["engine_bytes"] == report.engine_bytes
    assert not list(engine.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_profiles_from_spec(graphs: tuple[Path, dict[str, Any]]) -> None:
    _, spec = graphs
    prof = profiles_from_spec(spec, "lm_step")
    hidden, block = spec["hidden_size"], spec["block_size"]
    assert prof["inputs_embeds"] == ((1, 1, hidden), (1, block, hidden), (1, CAPACITY, hidden))
    assert prof["position_ids"][2] == (3, 1, CAPACITY)
    assert prof["key_end"] == ((1,), (block,), (CAPACITY,))
    vocab = spec["vocab_size"]  # typed slots: C up to 64 classes + the backend's allow-all row; Tc over T's range
    assert prof["allowed_table"] == ((1, vocab), (65, vocab), (65, vocab))
    assert prof["token_class"] == ((1, 1), (1, block), (1, CAPACITY))
    older = {**spec, "lm_step": {**spec["lm_step"], "inputs": [i for i in spec["lm_step"]["inputs"]
                                                               if i["name"] not in ("allowed_table", "token_class")]}}
    assert set(profiles_from_spec(older, "lm_step")) == {"inputs_embeds", "position_ids", "key_end"}
    from blockpilot.export.trt_plugin import plugin_profiles

    assert {"allowed_table", "token_class"} <= set(plugin_profiles(spec)) and "key_end" not in plugin_profiles(spec)
    assert profiles_from_spec(spec, "vision") == {}
    with pytest.raises(ValueError, match="unknown graph role"):
        profiles_from_spec(spec, "decoder")


@pytest.mark.parametrize("role", ["lm_step", "vision"])
def test_build_fp32_and_fp16(graphs: tuple[Path, dict[str, Any]], tmp_path: Path, role: str) -> None:
    trt = _trt_or_skip()
    onnx_dir, spec = graphs
    profiles = profiles_from_spec(spec, role)
    cache = tmp_path / "timing.cache"
    engine = tmp_path / f"{role}.fp32.engine"
    first = build_engine(onnx_dir / f"{role}.onnx", engine, profiles=profiles, timing_cache=cache, trt=trt)
    _check_report(first, engine, trt)
    if trt.is_rtx:  # timing caches are no-ops in TensorRT-RTX: say so instead of writing an empty file
        assert first.timing_cache is None and "no-op" in first.timing_cache_note and not cache.exists()
    else:
        assert first.timing_cache_note == "created" and cache.is_file()
    second = build_engine(onnx_dir / f"{role}.onnx", engine, profiles=profiles, timing_cache=cache, trt=trt)
    _check_report(second, engine, trt)
    assert second.timing_cache_note == ("reused" if not trt.is_rtx else first.timing_cache_note)

    fp16_onnx = tmp_path / f"{role}.fp16.onnx"
    counts = to_fp16_graph(onnx_dir / f"{role}.onnx", fp16_onnx)
    assert counts["initializers"] > 0 and counts["kept_fp32"] > 0
    model = onnx.load(str(fp16_onnx))
    f32 = onnx.TensorProto.FLOAT
    assert all(i.data_type != f32 for i in model.graph.initializer)
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert set(io_types) == {v["name"] for v in spec[role]["inputs"] + spec[role]["outputs"]}
    assert all(io_types[v["name"]] == f32 for v in spec[role]["inputs"] + spec[role]["outputs"]
               if v["dtype"] == "float32")  # the engine's I/O bindings stay float32
    fp16_engine = tmp_path / f"{role}.fp16.engine"
    report = build_engine(fp16_onnx, fp16_engine, profiles=profiles, trt=trt)
    _check_report(report, fp16_engine, trt)
    assert report.engine_bytes < first.engine_bytes  # fp16 weights


def test_typed_slot_inputs_stay_engine_inputs(graphs: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The lm_step graph gives allowed_table / token_class ONNX defaults; a build with their profiles parses a copy
    without them, so the network takes both as inputs (the graph itself is untouched); a build without their
    profiles folds them to constants, as engines were built before (they run unconstrained)."""
    import json

    from blockpilot.export.trt_build import input_defaults, without_defaults

    trt = _trt_or_skip()
    onnx_dir, spec = graphs
    graph = onnx_dir / "lm_step.onnx"
    assert input_defaults(graph, ("allowed_table", "token_class", "start")) == ["allowed_table", "token_class"]
    stripped = onnx.load_from_string(without_defaults(graph, ["allowed_table", "token_class"]))
    assert {"allowed_table", "token_class"} <= {i.name for i in stripped.graph.input}
    assert not {"allowed_table", "token_class"} & {t.name for t in stripped.graph.initializer}
    vocab = spec["vocab_size"]
    report = build_engine(graph, tmp_path / "typed.engine", profiles=profiles_from_spec(spec, "lm_step"), trt=trt)
    assert report.network is not None
    inputs = {i["name"]: i for i in json.loads(report.network.read_text())["inputs"]}
    assert (inputs["allowed_table"]["shape"], inputs["allowed_table"]["dtype"]) == ([-1, vocab], "BOOL")
    assert (inputs["token_class"]["shape"], inputs["token_class"]["dtype"]) == ([1, -1], "INT64")
    assert inputs["key_end"]["shape_tensor"] and not inputs["token_class"]["shape_tensor"]
    assert input_defaults(graph, ("allowed_table",)) == ["allowed_table"]  # the exported graph keeps its defaults

    plain = {k: v for k, v in profiles_from_spec(spec, "lm_step").items() if k not in ("allowed_table", "token_class")}
    report = build_engine(graph, tmp_path / "plain.engine", profiles=plain, trt=trt)
    assert report.network is not None
    names = [i["name"] for i in json.loads(report.network.read_text())["inputs"]]
    assert names == ["inputs_embeds", "position_ids", "start", "key_end", "mode", "past_k", "past_v"]


def test_missing_profile_is_refused(graphs: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    trt = _trt_or_skip()
    onnx_dir, spec = graphs
    profiles = dict(profiles_from_spec(spec, "lm_step"))
    del profiles["key_end"]
    with pytest.raises(ValueError, match="key_end"):
        build_engine(onnx_dir / "lm_step.onnx", tmp_path / "x.engine", profiles=profiles, trt=trt)
    assert not (tmp_path / "x.engine").exists()


def _plugin_graph(path: Path) -> Path:
    from onnx import TensorProto, helper

    node = helper.make_node("BlockDiffusionAttention", ["q", "k", "v"], ["out"], domain="blockpilot.plugins",
                            name="attn0")
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 16]) for n in ("q", "k", "v", "out")]
    graph = helper.make_graph([node], "plugin", vi[:3], vi[3:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("blockpilot.plugins", 1)])
    onnx.save(model, str(path))
    return path


def test_plugin_graph_refused_before_parsing(tmp_path: Path) -> None:
    def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("the parser must not see a plugin graph: TensorRT-RTX aborts the process")

    fake = TensorRT(cast(Any, SimpleNamespace(OnnxParser=never, Builder=never, Logger=never)), "tensorrt-rtx", "1.7.1")
    graph = _plugin_graph(tmp_path / "plugin.onnx")
    with pytest.raises(PluginGraphError, match="TensorRT-RTX builds no plugin layers") as info:
        build_engine(graph, tmp_path / "plugin.engine", trt=fake)
    assert "blockpilot.plugins::BlockDiffusionAttention" in str(info.value)
    assert not (tmp_path / "plugin.engine").exists()
    assert trt_build.custom_domain_nodes(onnx.load(str(graph))) == [
        "blockpilot.plugins::BlockDiffusionAttention (attn0)"]


def test_load_tensorrt_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(TrtUnavailableError, match="no TensorRT here") as info:
        load_tensorrt()
    assert "tensorrt_rtx" in str(info.value) and isinstance(info.value, ImportError)


def test_load_tensorrt_flavor() -> None:
    trt = _trt_or_skip()
    assert trt.flavor in ("tensorrt", "tensorrt-rtx") and trt.version
    assert trt.Builder is trt.module.Builder  # attribute access falls through to the module


def test_fp16_graph_matches_fp32_on_onnxruntime(graphs: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    onnx_dir, spec = graphs
    to_fp16_graph(onnx_dir / "lm_step.onnx", tmp_path / "lm16.onnx")
    t, rng = 16, np.random.default_rng(0)
    cache = [int(d) for d in spec["lm_step"]["inputs"][5]["shape"]]
    feeds = {"inputs_embeds": rng.standard_normal((1, t, spec["hidden_size"])).astype(np.float32),
             "position_ids": np.broadcast_to(np.arange(t), (3, 1, t)).copy(), "start": np.array(0),
             "key_end": np.array(t), "mode": np.array(1), "past_k": np.zeros(cache, np.float32),
             "past_v": np.zeros(cache, np.float32)}
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
            for p in (onnx_dir / "lm_step.onnx", tmp_path / "lm16.onnx")]
    (top_a, prob_a, k_a, _), (top_b, prob_b, k_b, _) = runs
    assert (top_a == top_b).mean() >= 0.9
    assert np.abs(prob_a - prob_b).max() < 0.05 and np.abs(k_a - k_b).max() < 0.05


def _fp8_graph(path: Path) -> Path:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
             helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "zp"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "zp"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "zp"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_fp8_qdq_graph_builds_strongly_typed(tmp_path: Path) -> None:
    trt = _trt_or_skip()
    graph = _fp8_graph(tmp_path / "fp8.onnx")
    assert trt_build.uses_fp8(onnx.load(str(graph)))
    profiles = {"x": ((1, 1, 64), (1, 8, 64), (1, 32, 64))}
    report = build_engine(graph, tmp_path / "fp8.engine", profiles=profiles, trt=trt)
    _check_report(report, tmp_path / "fp8.engine", trt)
    if trt.is_rtx:  # Ampere has no fp8: refused up front rather than failing deep in the builder
        with pytest.raises(ValueError, match="FP8 graph needs compute capability"):
            build_engine(graph, tmp_path / "fp8.sm86.engine", profiles=profiles, compute_capability="8.6", trt=trt)


def _io_types(path: Path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def test_fp16_cache_io_graph_and_engine_declare_half(graphs: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The LM step rewritten with fp16 cache I/O: past_k / past_v and k_new / v_new are float16 graph I/O (no Cast
    at the boundary), the rest stays as it was; the graph passes the full checker and strict shape inference, and
    the strongly typed network TensorRT(-RTX) builds from it (on this CPU) takes and gives HALF for those."""
    import json

    from blockpilot.export.bundle_export import kv_cache_record
    from blockpilot.export.fp16_graph import KV_CACHE_IO

    trt = _trt_or_skip()
    onnx_dir, spec = graphs
    out = tmp_path / "lm16.onnx"
    counts = to_fp16_graph(onnx_dir / "lm_step.onnx", out, fp16_io=KV_CACHE_IO)
    assert counts["fp16_io"] == 4
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = _io_types(out)
    assert {n: types[n] for n in KV_CACHE_IO} == dict.fromkeys(KV_CACHE_IO, f16)
    assert types["inputs_embeds"] == types["prob"] == f32 and types["top1"] == onnx.TensorProto.INT64
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    # No Cast right at the cache boundary: the inputs are read as they come, the outputs written directly.
    producers = {o: n for n in model.graph.node for o in n.output}
    assert all(producers[n].op_type != "Cast" for n in ("k_new", "v_new"))
    assert not [n for n in model.graph.node if n.op_type == "Cast" and set(n.input) & {"past_k", "past_v"}]
    report = build_engine(out, tmp_path / "lm16.engine", profiles=profiles_from_spec(spec, "lm_step"), trt=trt)
    assert report.network is not None
    network = json.loads(report.network.read_text())
    kinds = {t["name"]: t["dtype"] for t in [*network["inputs"], *network["outputs"]]}
    assert {n: kinds[n] for n in KV_CACHE_IO} == dict.fromkeys(KV_CACHE_IO, "HALF")
    assert kinds["inputs_embeds"] == kinds["prob"] == "FLOAT"
    assert kv_cache_record(report.network) == {"dtype": "float16", "tensors": dict.fromkeys(KV_CACHE_IO, "HALF")}
    with pytest.raises(ValueError, match=r"fp16_io names \['top1'\]"):  # not a float32 I/O tensor
        to_fp16_graph(onnx_dir / "lm_step.onnx", tmp_path / "bad.onnx", fp16_io=("past_k", "top1"))


def test_fp16_cache_io_graph_decodes_like_fp32_on_onnxruntime(graphs: tuple[Path, dict[str, Any]],
                                                              tmp_path: Path) -> None:
    """A few committed steps of the reference model on ONNX Runtime (CPU), each graph carrying its own cache in its
    own dtype: the fp16 graph with fp16 cache I/O gives the fp32 graph's top-1 tokens."""
    import numpy as np
    import onnxruntime as ort

    from blockpilot.export.fp16_graph import KV_CACHE_IO
    from blockpilot.formats.embedding_table import EmbeddingTable
    from blockpilot.runtime.kv_window import write_rows
    from blockpilot.vla.modes import AttentionMode

    onnx_dir, spec = graphs
    to_fp16_graph(onnx_dir / "lm_step.onnx", tmp_path / "lm16.onnx", fp16_io=KV_CACHE_IO)
    table = EmbeddingTable(spec, onnx_dir)
    cache = [int(d) for d in spec["lm_step"]["inputs"][5]["shape"]]
    ids = np.random.default_rng(0).integers(10, 200, 64)
    tops = []
    for path, dtype in ((onnx_dir / "lm_step.onnx", np.float32), (tmp_path / "lm16.onnx", np.float16)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        k, v, start, top = np.zeros(cache, dtype), np.zeros(cache, dtype), 0, []
        for t in (24, 8, 8, 8):  # a prefill, then three committed blocks
            feeds = {"inputs_embeds": table[ids[start:start + t]][None],
                     "position_ids": np.broadcast_to(np.arange(start, start + t), (3, 1, t)).copy(),
                     "start": np.array(start), "key_end": np.array(start + t),
                     "mode": np.array(AttentionMode.CAUSAL.id), "past_k": k, "past_v": v}
            top1, _, k_new, v_new = session.run(["top1", "prob", "k_new", "v_new"], feeds)
            assert k_new.dtype == v_new.dtype == dtype
            write_rows(k, k_new, start)
            write_rows(v, v_new, start)
            top.append(top1)
            start += t
        tops.append(np.concatenate(top, axis=1))
    np.testing.assert_array_equal(tops[0], tops[1])
