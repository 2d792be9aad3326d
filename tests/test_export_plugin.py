"""The plugin variant of lm_step.onnx (one BlockDiffusionAttention node per layer) and its TensorRT plugin.

The shipped plugin graph cannot run anywhere but TensorRT proper, so its wiring is checked numerically on a
test-only copy whose custom op gets a model-local ONNX function in standard ops, run in ONNX Runtime against the
decomposed graph. The plugin's Python side (:mod:`blockpilot.trt.plugin`, shared with the runtime) is exercised
through the TensorRT(-RTX) bindings installed here;
building a plugin engine needs TensorRT proper (a Jetson) and running the plugin needs a GPU.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto

from blockpilot.export.onnx_graphs import export_onnx
from blockpilot.export.plugin_attention import export_plugin_graph, plugin_nodes, with_reference_function
from blockpilot.export.trt_build import PluginGraphError, check_buildable
from blockpilot.export.trt_plugin import build_plugin_engine, plugin_profiles
from blockpilot.formats.embedding_table import EmbeddingTable
from blockpilot.formats.onnx_spec import (
    LM_FILE,
    PLUGIN_DOMAIN,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    SPEC_FILE,
)
from blockpilot.runtime.kv_window import write_rows
from blockpilot.trt.compat import TensorRT, TrtUnavailableError, load_tensorrt
from blockpilot.trt.plugin import (
    ALIASES,
    PARSER_FIELDS,
    AttentionAttrs,
    PluginFieldError,
    PluginShapeError,
    attrs_from_fields,
    attrs_to_fields,
    check_input_shapes,
    output_shapes,
    output_types,
    plugin_classes,
    register_plugin,
    run_plugin,
    supports_combination,
)
from blockpilot.vla.loader import load_model

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"
CAPACITY = 128
ATTRS = AttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=32, block_size=32, scale=1 / math.sqrt(32))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = load_model(REFERENCE)
    decomposed, plugin = tmp_path_factory.mktemp("decomposed"), tmp_path_factory.mktemp("plugin")
    return {"model": model, "decomposed": decomposed, "plugin": plugin,
            "decomposed_spec": export_onnx(model, decomposed, CAPACITY),
            "plugin_spec": export_plugin_graph(model, plugin, CAPACITY)}


def _trt() -> TensorRT:
    try:
        return load_tensorrt()
    except TrtUnavailableError as exc:
        pytest.skip(f"no TensorRT / TensorRT-RTX here: {exc}")


# -- the graph ---------------------------------------------------------------------------------------------------


def test_one_plugin_node_per_layer_with_its_attributes(exports: dict[str, Any]) -> None:
    config = exports["model"].config.lm
    model = onnx.load(str(exports["plugin"] / LM_FILE))
    onnx.checker.check_model(model, full_check=True)
    nodes = plugin_nodes(exports["plugin"] / LM_FILE)
    assert len(nodes) == config.num_layers == 4
    for node in nodes:
        assert node["domain"] == PLUGIN_DOMAIN == "blockpilot"
        attrs = node["attrs"]
        assert attrs.pop("plugin_namespace") == PLUGIN_NAMESPACE and attrs.pop("plugin_version") == PLUGIN_VERSION
        assert attrs.pop("scale") == pytest.approx(1 / math.sqrt(config.head_dim), rel=1e-7)
        assert attrs == {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
                         "head_dim": config.head_dim, "block_size": exports["model"].config.diffusion.block_size}
        assert len(node["inputs"]) == 8 and len(node["outputs"]) == 3
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), (PLUGIN_DOMAIN, 1)}


def test_the_attention_and_cache_write_live_only_in_the_plugin(exports: dict[str, Any]) -> None:
    model = onnx.load(str(exports["plugin"] / LM_FILE))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Softmax"] == 1  # the top-1 probability head; no decomposed attention softmax is left
    assert ops["Range"] == 0  # no slot arithmetic for the cache write
    # no additive attention mask: the one Where is the typed-slot logits mask (export.typed_slots_graph)
    wheres = [n for n in model.graph.node if n.op_type == "Where"]
    producers = {out: n for n in model.graph.node for out in n.output}
    assert len(wheres) == 1 and producers[wheres[0].input[0]].input[0] == "allowed_table"
    assert ops[PLUGIN_NAME] == 4


def test_scalar_inputs_are_int32_one_element_tensors_shared_by_all_layers(exports: dict[str, Any]) -> None:
    model = onnx.load(str(exports["plugin"] / LM_FILE))
    producers = {out: n for n in model.graph.node for out in n.output}
    nodes = plugin_nodes(model)
    for position, graph_input in ((5, "start"), (6, "key_end"), (7, "mode")):
        names = {node["inputs"][position] for node in nodes}
        assert len(names) == 1  # made once, read by every layer
        reshape = producers[names.pop()]
        assert reshape.op_type == "Reshape"
        cast = producers[reshape.input[0]]
        assert cast.op_type == "Cast" and cast.input[0] == graph_input
        assert next(a.i for a in cast.attribute if a.name == "to") == TensorProto.INT32
    # the layer's caches come straight from the graph's cache inputs and go back to its outputs
    for layer, node in enumerate(nodes):
        for position, past in ((3, "past_k"), (4, "past_v")):
            gather = producers[node["inputs"][position]]
            assert gather.op_type == "Gather" and gather.input[0] == past
            index = onnx.numpy_helper.to_array(next(a.t for a in producers[gather.input[1]].attribute))
            assert int(index) == layer


def test_graph_io_and_spec_match_the_decomposed_export(exports: dict[str, Any]) -> None:
    plugin = onnx.load(str(exports["plugin"] / LM_FILE))
    decomposed = onnx.load(str(exports["decomposed"] / LM_FILE))
    assert list(plugin.graph.input) == list(decomposed.graph.input)
    assert list(plugin.graph.output) == list(decomposed.graph.output)
    spec = dict(exports["plugin_spec"])
    assert spec.pop("variant") == "plugin"
    assert spec.pop("plugin") == {"domain": "blockpilot", "op_type": "BlockDiffusionAttention", "version": "1",
                                  "namespace": "blockpilot", "nodes": 4,
                                  "inputs": ["q", "k_new", "v_new", "past_k", "past_v", "start", "key_end", "mode"],
                                  "outputs": ["attn", "present_k", "present_v"],
                                  "scalar_inputs": {"dtype": "int32", "shape": [1]}}
    decomposed_spec = dict(exports["decomposed_spec"])
    # The tied embedding is each graph's own head initializer (torch names it per export).
    embed, decomposed_embed = spec.pop("embed"), decomposed_spec.pop("embed")
    assert {**embed, "tensor": ""} == {**decomposed_embed, "tensor": ""}
    assert spec == decomposed_spec
    assert json.loads((exports["plugin"] / SPEC_FILE).read_text()) == exports["plugin_spec"]
    assert "variant" not in exports["decomposed_spec"]


def _feeds(embed: EmbeddingTable, rng: np.random.Generator, t: int, start: int, key_end: int, mode: int,
           past: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    ids = rng.integers(8, embed.shape[0], size=t)
    return {"inputs_embeds": embed[ids][None].astype(np.float32),
            "position_ids": np.broadcast_to(np.arange(start, start + t), (3, 1, t)).astype(np.int64).copy(),
            "start": np.array(start, np.int64), "key_end": np.array(key_end, np.int64),
            "mode": np.array(mode, np.int64), "past_k": past[0], "past_v": past[1]}


def _sessions(exports: dict[str, Any], plugin_model: Any) -> tuple[Any, Any]:
    providers = ["CPUExecutionProvider"]
    ref = onnxruntime.InferenceSession(str(exports["decomposed"] / LM_FILE), providers=providers)
    got = onnxruntime.InferenceSession(plugin_model.SerializeToString(), providers=providers)
    return ref, got


def test_plugin_graph_runs_like_the_decomposed_one(exports: dict[str, Any]) -> None:
    model = with_reference_function(onnx.load(str(exports["plugin"] / LM_FILE)))
    onnx.checker.check_model(model, full_check=True)
    ref, got = _sessions(exports, model)
    embed = EmbeddingTable(exports["decomposed_spec"], exports["decomposed"])
    rng = np.random.default_rng(0)
    shape = tuple(exports["decomposed_spec"]["lm_step"]["inputs"][5]["shape"])
    past = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
    # prefill a prompt (block mask), a denoising step of one block (bidirectional), a causal commit step
    for t, start, key_end, mode in ((40, 0, 40, 1), (32, 40, 72, 2), (8, 72, 80, 0)):
        feeds = _feeds(embed, rng, t, start, key_end, mode, past)
        want, have = ref.run(None, feeds), got.run(None, feeds)
        np.testing.assert_array_equal(have[0], want[0])
        np.testing.assert_allclose(have[1], want[1], atol=1e-6)
        np.testing.assert_allclose(have[2], want[2], atol=1e-6)
        np.testing.assert_allclose(have[3], want[3], atol=1e-6)
        assert want[2].shape == (*shape[:3], t, shape[4])  # the window's K/V only; the cache is the caller's
        past = tuple(p.copy() for p in past)
        write_rows(past[0], want[2], start)
        write_rows(past[1], want[3], start)
    assert np.abs(past[0][:, :, :, 80:]).max() == 0.0 and np.abs(past[0][:, :, :, :80]).max() > 0.0


def test_the_numeric_check_catches_a_miswired_node(exports: dict[str, Any]) -> None:
    model = with_reference_function(onnx.load(str(exports["plugin"] / LM_FILE)))
    node = next(n for n in model.graph.node if n.op_type == PLUGIN_NAME)
    node.input[1], node.input[2] = node.input[2], node.input[1]  # k_new <-> v_new
    ref, got = _sessions(exports, model)
    shape = tuple(exports["decomposed_spec"]["lm_step"]["inputs"][5]["shape"])
    embed = EmbeddingTable(exports["decomposed_spec"], exports["decomposed"])
    zeros = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
    feeds = _feeds(embed, np.random.default_rng(1), 16, 0, 16, 1, zeros)
    assert np.abs(got.run(None, feeds)[2] - ref.run(None, feeds)[2]).max() > 1e-2


def test_tensorrt_rtx_refuses_the_plugin_graph_before_its_parser(exports: dict[str, Any]) -> None:
    with pytest.raises(PluginGraphError, match=r"4 node\(s\) in a custom domain.*blockpilot::BlockDiffusionAttention"):
        check_buildable(exports["plugin"] / LM_FILE, "tensorrt-rtx")
    check_buildable(exports["plugin"] / LM_FILE, "tensorrt")  # TensorRT proper takes plugin graphs


def test_build_plugin_engine_raises_the_typed_error_with_tensorrt_rtx(exports: dict[str, Any], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        trt = load_tensorrt(prefer=("tensorrt_rtx",))
    except TrtUnavailableError as exc:
        pytest.skip(f"TensorRT-RTX is not installed here: {exc}")
    from blockpilot.export import trt_build

    def no_parser(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the TensorRT-RTX parser must never see a plugin graph")

    monkeypatch.setattr(trt_build, "parse_network", no_parser)
    with pytest.raises(PluginGraphError, match="TensorRT-RTX"):
        build_plugin_engine(exports["plugin"] / LM_FILE, tmp_path / "plugin.engine", spec=exports["plugin_spec"],
                            trt=trt)
    assert not (tmp_path / "plugin.engine").exists()


def test_plugin_profiles_drop_key_end(exports: dict[str, Any]) -> None:
    profiles = plugin_profiles(exports["plugin_spec"])
    assert set(profiles) == {"inputs_embeds", "position_ids", "allowed_table", "token_class"}  # typed slots too
    assert profiles["inputs_embeds"][2] == (1, CAPACITY, 128)
    assert profiles["token_class"][2] == (1, CAPACITY)


@pytest.mark.tensorrt
def test_plugin_engine_builds_with_tensorrt(exports: dict[str, Any], tmp_path: Path) -> None:
    try:
        trt = load_tensorrt(prefer=("tensorrt",))
    except TrtUnavailableError as exc:
        pytest.skip(f"needs full TensorRT: {exc}")
    report = build_plugin_engine(exports["plugin"] / LM_FILE, tmp_path / "plugin.engine",
                                 spec=exports["plugin_spec"], trt=trt)
    assert report.engine_bytes > 0 and report.flavor == "tensorrt"


# -- the plugin's rules (pure) ------------------------------------------------------------------------------------


def test_fields_round_trip_and_node_attributes_are_valid_fields(exports: dict[str, Any]) -> None:
    assert attrs_from_fields(attrs_to_fields(ATTRS)) == AttentionAttrs(4, 2, 32, 32, float(np.float32(ATTRS.scale)))
    node_attrs = plugin_nodes(exports["plugin"] / LM_FILE)[0]["attrs"]
    assert set(node_attrs) - PARSER_FIELDS == {"num_heads", "num_kv_heads", "head_dim", "block_size", "scale"}
    assert attrs_from_fields(node_attrs).num_heads == 4  # what the parser hands over, plus its own two, is accepted


@pytest.mark.parametrize(("change", "field"), [
    ({"num_heads": None}, "num_heads"),
    ({"head_dim": np.array([0], np.int32)}, "head_dim"),
    ({"block_size": np.array([-32], np.int32)}, "block_size"),
    ({"num_kv_heads": np.array([3], np.int32)}, "num_kv_heads"),
    ({"scale": np.array([float("nan")], np.float32)}, "scale"),
    ({"scale": np.array([0.5, 0.5], np.float32)}, "scale"),
    ({"num_heads": np.array([4.5], np.float32)}, "num_heads"),
    ({"window": np.array([1], np.int32)}, "window"),
])
def test_bad_fields_name_the_field(change: dict[str, Any], field: str) -> None:
    fields: dict[str, Any] = dict(attrs_to_fields(ATTRS))
    for name, value in change.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    with pytest.raises(PluginFieldError, match=field) as info:
        attrs_from_fields(fields)
    assert info.value.field == field


def test_shape_rules() -> None:
    shapes = [(1, 4, 7, 32), (1, 2, 7, 32), (1, 2, 7, 32), (1, 2, 128, 32), (1, 2, 128, 32), (1,), (1,), (1,)]
    assert output_shapes(shapes, ATTRS) == [(1, 4, 7, 32), (1, 2, 128, 32), (1, 2, 128, 32)]
    check_input_shapes([(1, 4, -1, 32), (1, 2, -1, 32), (1, 2, -1, 32), *shapes[3:]], ATTRS)  # dynamic T
    bad = {0: (1, 2, 7, 32), 1: (1, 2, 6, 32), 4: (1, 2, 64, 32), 5: (), 3: (1, 2, 128, 16)}
    for position, shape in bad.items():
        with pytest.raises(PluginShapeError):
            check_input_shapes([shape if i == position else s for i, s in enumerate(shapes)], ATTRS)
    with pytest.raises(PluginShapeError, match="8 inputs"):
        check_input_shapes(shapes[:7], ATTRS)


def test_type_and_format_rules() -> None:
    floats = ["HALF"] * 5 + ["INT32"] * 3 + ["HALF"] * 3
    linear = ["LINEAR"] * 11
    assert all(supports_combination(pos, floats, linear) for pos in range(11))
    assert output_types(floats[:8]) == ["HALF"] * 3
    assert output_types(["BF16"] * 5 + ["INT32"] * 3) == ["BF16"] * 3
    with pytest.raises(TypeError):
        output_types(["INT32"] * 8)
    assert not supports_combination(0, ["INT8"], ["LINEAR"])
    assert not supports_combination(0, ["FLOAT"], ["CHW4"])
    assert not supports_combination(3, ["HALF", "HALF", "HALF", "FLOAT"], ["LINEAR"] * 4)  # past follows q
    assert not supports_combination(6, [*floats[:6], "INT64"], linear)  # scalars are INT32
    assert not supports_combination(9, [*floats[:9], "FLOAT"], linear)  # present follows q


# -- the plugin's TensorRT classes (TensorRT-RTX has them; none of this needs a GPU) --------------------------------


def _fields(trt: TensorRT, attrs: AttentionAttrs) -> Any:
    arrays = attrs_to_fields(attrs)
    kinds = {np.dtype(np.int32): trt.PluginFieldType.INT32, np.dtype(np.float32): trt.PluginFieldType.FLOAT32}
    return arrays, trt.PluginFieldCollection([trt.PluginField(n, a, kinds[a.dtype]) for n, a in arrays.items()])


def test_creator_registers_once_and_is_found() -> None:
    trt = _trt()
    creator = register_plugin(trt)
    assert register_plugin(trt) is creator and register_plugin(trt.module) is creator
    found = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert found is creator
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("BlockDiffusionAttention",
                                                                                "blockpilot", "1")
    assert {f.name: f.type for f in creator.field_names} == {
        "num_heads": trt.PluginFieldType.INT32, "num_kv_heads": trt.PluginFieldType.INT32,
        "head_dim": trt.PluginFieldType.INT32, "block_size": trt.PluginFieldType.INT32,
        "scale": trt.PluginFieldType.FLOAT32}


def test_create_plugin_serialize_clone() -> None:
    trt = _trt()
    creator = register_plugin(trt)
    arrays, fc = _fields(trt, ATTRS)
    plugin = creator.create_plugin("layer0", fc, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == attrs_from_fields(arrays)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version, plugin.num_outputs) == (
        PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, 3)
    serialized = plugin.get_fields_to_serialize()
    again = creator.create_plugin("layer0", serialized, trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and again.phase == trt.TensorRTPhase.RUNTIME
    clone = plugin.clone()
    assert clone is not plugin and clone.attrs == plugin.attrs and type(clone) is type(plugin)
    assert plugin.attach_to_context(None).attrs == plugin.attrs
    assert plugin.get_capability_interface(trt.PluginCapabilityType.BUILD) is plugin
    bad_arrays, bad_fc = _fields(trt, ATTRS)
    bad_arrays["num_kv_heads"][0] = 3
    with pytest.raises(PluginFieldError, match="num_kv_heads"):
        creator.create_plugin("bad", bad_fc, trt.TensorRTPhase.BUILD)


def test_plugin_types_formats_shapes_and_aliases() -> None:
    trt = _trt()
    plugin_cls, _ = plugin_classes(trt)
    plugin = plugin_cls(ATTRS)
    types = [trt.DataType.HALF] * 5 + [trt.DataType.INT32] * 3
    assert plugin.get_output_data_types(types) == [trt.DataType.HALF] * 3
    descs = []
    for dtype in types + [trt.DataType.HALF] * 3:
        desc = trt.DynamicPluginTensorDesc()
        desc.desc.type, desc.desc.format = dtype, trt.TensorFormat.LINEAR
        descs.append(desc)
    assert all(plugin.supports_format_combination(pos, descs, 8) for pos in range(11))
    descs[9].desc.type = trt.DataType.FLOAT
    assert not plugin.supports_format_combination(9, descs, 8)
    shapes = plugin.get_output_shapes([trt.DimsExprs(4)] * 5 + [trt.DimsExprs(1)] * 3, [], None)
    assert [len(s) for s in shapes] == [4, 4, 4]
    if plugin.aliasing:
        assert [plugin.get_aliased_input(i) for i in range(3)] == [-1, 3, 4] == [ALIASES.get(i, -1) for i in range(3)]


# -- running the plugin's work on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("aliased", [True, False])
def test_run_plugin_on_cuda(aliased: bool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from blockpilot.kernels.reference import block_diffusion_attention_ref, write_window

    gen = torch.Generator().manual_seed(0)
    q, k_new, v_new = (torch.randn(*s, generator=gen).half().cuda() for s in ((1, 4, 9, 32), (1, 2, 9, 32),
                                                                              (1, 2, 9, 32)))
    past_k, past_v = (torch.randn(1, 2, 128, 32, generator=gen).half().cuda() for _ in range(2))
    want_k, want_v = write_window(past_k, k_new, 40), write_window(past_v, v_new, 40)
    want = block_diffusion_attention_ref(q, want_k, want_v, 40, 49, 2, 32, ATTRS.scale)
    scalars = [torch.tensor([v], dtype=torch.int32, device="cuda") for v in (40, 49, 2)]
    attn = torch.empty_like(q)
    present_k, present_v = (past_k, past_v) if aliased else (torch.empty_like(past_k), torch.empty_like(past_v))
    inputs = [(t.data_ptr(), tuple(t.shape), "HALF") for t in (q, k_new, v_new, past_k, past_v)]
    inputs += [(t.data_ptr(), (1,), "INT32") for t in scalars]
    outputs = [(t.data_ptr(), tuple(t.shape), "HALF") for t in (attn, present_k, present_v)]
    run_plugin(ATTRS, inputs, outputs, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(present_k, want_k) and torch.equal(present_v, want_v)
    assert (attn.float() - want).abs().max().item() < 2e-3


def test_onnx_runtime_backend_refuses_the_plugin_export(exports: dict[str, Any]) -> None:
    from blockpilot.runtime.ort_backend import OrtBackend
    from blockpilot.runtime.plan_types import PlannerSetupError

    with pytest.raises(PlannerSetupError, match=r"BlockDiffusionAttention nodes\).*decomposed export"):
        OrtBackend(exports["plugin"])
