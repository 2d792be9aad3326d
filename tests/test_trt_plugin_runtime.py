"""Plugin engines on the TensorRT runtime, on the CPU: the shared ``blockpilot.trt`` package and its layering,
where ``key_end`` lives (decided from networks TensorRT-RTX really parses, and from the real plugin graph's
wiring), engine selection over a bundle that lists a plugin engine, and the plugin registered from the runtime's
load path against TensorRT-RTX's registry (TensorRT-RTX comes with the dev install, the trt extra).
Deserializing and running a plugin engine needs TensorRT proper on a GPU (the ``tensorrt`` / ``gpu`` tests of
``test_export_plugin.py`` and ``test_runtime_trt.py``)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from blockpilot.export import plugin_attention, trt_build, trt_plugin
from blockpilot.export.native_attention import to_native_attention
from blockpilot.export.onnx_graphs import export_onnx
from blockpilot.export.plugin_attention import export_plugin_graph, plugin_nodes
from blockpilot.formats import onnx_spec
from blockpilot.formats.bundle import BundleWriter, load_bundle
from blockpilot.formats.onnx_spec import LM_FILE, PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from blockpilot.runtime.kv_window import StaleExportError
from blockpilot.runtime.plan_types import PlannerSetupError
from blockpilot.runtime.trt_backend import EngineSelectionError, select_engines
from blockpilot.runtime.trt_engine import LM_INPUTS, LM_OUTPUTS, TrtEngine, dtype_name, lm_layout
from blockpilot.trt import compat, plugin
from blockpilot.trt.compat import TensorRT, TrtUnavailableError, load_tensorrt
from blockpilot.vla.loader import load_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "models" / "reference"
CAPACITY = 64


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference model's decomposed, native-attention and plugin LM-step graphs."""
    model = load_model(REFERENCE)
    decomposed, plugin_dir = tmp_path_factory.mktemp("decomposed"), tmp_path_factory.mktemp("plugin")
    export_onnx(model, decomposed, CAPACITY)
    export_plugin_graph(model, plugin_dir, CAPACITY)
    to_native_attention(decomposed / LM_FILE, decomposed / "lm_step.native.onnx")
    return {"decomposed": decomposed / LM_FILE, "native": decomposed / "lm_step.native.onnx",
            "plugin": plugin_dir / LM_FILE}


# -- the shared package and the layering ----------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Absolute names of the blockpilot modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            found.add(".".join(p for p in (base, node.module or "") if p))
    return {name for name in found if name.startswith("blockpilot")}


def test_runtime_never_imports_export_and_trt_imports_neither() -> None:
    for folder, banned in (("runtime", ("blockpilot.export",)),
                           ("trt", ("blockpilot.export", "blockpilot.runtime"))):
        files = sorted((ROOT / "blockpilot" / folder).rglob("*.py"))
        assert files
        for path in files:
            bad = sorted(n for n in _imports(path) if n.startswith(banned))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    assert "blockpilot.trt.plugin" in _imports(ROOT / "blockpilot" / "runtime" / "trt_engine.py")


def test_old_names_are_the_moved_objects() -> None:
    assert trt_build.load_tensorrt is load_tensorrt and trt_build.TensorRT is TensorRT
    assert trt_build.TrtUnavailableError is TrtUnavailableError
    for name in plugin.__all__:  # the plugin's names, still importable from export.trt_plugin
        assert getattr(trt_plugin, name) is getattr(plugin, name), name
    for name in ("PLUGIN_DOMAIN", "PLUGIN_NAME", "PLUGIN_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_OPSET",
                 "PLUGIN_INPUTS", "PLUGIN_OUTPUTS"):
        assert getattr(plugin_attention, name) is getattr(onnx_spec, name), name
    assert plugin.PLUGIN_INPUTS is onnx_spec.PLUGIN_INPUTS


def test_load_tensorrt_names_the_one_missing_module() -> None:
    with pytest.raises(TrtUnavailableError, match="no TensorRT here") as info:
        load_tensorrt(prefer=("no_such_tensorrt",))
    assert info.value.name == "no_such_tensorrt" and isinstance(info.value, ImportError)
    with pytest.raises(TrtUnavailableError) as both:
        load_tensorrt(prefer=("no_such_tensorrt", "nor_this_one"))
    assert both.value.name is None
    assert compat.trt_module(SimpleNamespace) is SimpleNamespace  # a bare module passes through


def test_plugin_run_requirements_name_the_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin.check_run_requirements()  # torch and triton are installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ImportError, match="triton is not installed") as info:
        plugin.check_run_requirements()
    assert info.value.name == "triton"


# -- where key_end lives: real networks and the real plugin graph -----------------------------------------------------


def _parsed_layout(onnx_path: Path) -> Any:
    """:func:`lm_layout` of the network TensorRT-RTX parses from ``onnx_path`` (``ITensor.is_shape_tensor`` is
    what the engine's ``is_shape_inference_io`` reports for an input)."""
    trt = load_tensorrt(prefer=("tensorrt_rtx",))
    _, network = trt_build.parse_network(trt, trt.Logger(trt.Logger.ERROR), onnx_path)
    tensors = {t.name: t for t in [network.get_input(i) for i in range(network.num_inputs)]
               + [network.get_output(i) for i in range(network.num_outputs)]}
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    return lm_layout(inputs, outputs, lambda n: bool(tensors[n].is_shape_tensor),
                     lambda n: dtype_name(tensors[n].dtype), onnx_path)


@pytest.mark.parametrize("variant", ["decomposed", "native"])
def test_key_end_is_a_host_shape_tensor_of_decomposed_and_native_networks(graphs: dict[str, Path],
                                                                          variant: str) -> None:
    layout = _parsed_layout(graphs[variant])
    assert layout.key_end_on_host
    assert layout.dtypes["key_end"] == layout.dtypes["start"] == layout.dtypes["mode"] == np.int64
    assert layout.dtypes["past_k"] == layout.dtypes["inputs_embeds"] == np.float32
    assert set(layout.dtypes) == {*LM_INPUTS, *LM_OUTPUTS}


def _plugin_free_twin(plugin_graph: Path, out: Path) -> Path:
    """The plugin graph with each plugin node replaced by elementwise standard ops that read its eight inputs the
    way the plugin does (``start`` / ``key_end`` / ``mode`` as int32 data, no shape use) and give its three
    outputs their shapes; TensorRT-RTX parses it, where the real plugin graph would abort its parser."""
    model = onnx.load(str(plugin_graph))
    nodes = []
    for node in model.graph.node:
        if node.op_type != PLUGIN_NAME:
            nodes.append(node)
            continue
        q, _, _, past_k, past_v, start, key_end, mode = node.input
        p = node.name.replace("/", "_")
        nodes += [helper.make_node("Add", [start, key_end], [f"{p}_sk"]),
                  helper.make_node("Add", [f"{p}_sk", mode], [f"{p}_skm"]),
                  helper.make_node("Cast", [f"{p}_skm"], [f"{p}_f"], to=TensorProto.FLOAT),
                  helper.make_node("Add", [q, f"{p}_f"], [node.output[0]]),
                  helper.make_node("Add", [past_k, f"{p}_f"], [node.output[1]]),
                  helper.make_node("Add", [past_v, f"{p}_f"], [node.output[2]])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != PLUGIN_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def test_key_end_that_only_feeds_the_plugins_is_a_device_input(graphs: dict[str, Path], tmp_path: Path) -> None:
    layout = _parsed_layout(_plugin_free_twin(graphs["plugin"], tmp_path / "twin.onnx"))
    assert not layout.key_end_on_host and layout.dtypes["key_end"] == np.int64


def test_plugin_graph_io_is_the_decomposed_io_and_its_aliasing_stays_inside(graphs: dict[str, Path]) -> None:
    """What lets the one in-place cache hold for plugin engines: same network I/O as the decomposed graph;
    every plugin reads a ``Gather`` of the graph's cache (its in-place, aliased write lands in that network-internal
    slice, never in a network input or output), and the graph returns the window's K/V that the plugins were fed,
    stacked; ``key_end`` reaches only the plugins, through ``Cast`` + ``Reshape`` (no shape computation: a device
    input)."""
    model, decomposed = onnx.load(str(graphs["plugin"])), onnx.load(str(graphs["decomposed"]))
    assert list(model.graph.input) == list(decomposed.graph.input)
    assert list(model.graph.output) == list(decomposed.graph.output)
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in model.graph.node for out in node.output}
    nodes = plugin_nodes(model)
    io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    assert len(nodes) == 4 and not any(set(n["inputs"] + n["outputs"]) & io for n in nodes)
    for scalar in ("start", "key_end", "mode"):
        (cast,) = consumers[scalar]
        (reshape,) = consumers[cast.output[0]]
        assert (cast.op_type, reshape.op_type) == ("Cast", "Reshape")
        assert {n.op_type for n in consumers[reshape.output[0]]} == {PLUGIN_NAME}
    for past, window, position in (("past_k", "k_new", 1), ("past_v", "v_new", 2)):
        assert Counter(n.op_type for n in consumers[past]) == Counter({"Gather": 4})
        concat = producers[window]
        assert concat.op_type == "Concat"
        layer_rows = [producers[u].input[0] for u in concat.input]
        assert layer_rows == [n["inputs"][position] for n in nodes]


def test_lm_layout_refuses_other_graphs_and_other_host_inputs() -> None:
    names = list(LM_INPUTS)
    kind = {n: "INT64" for n in ("start", "key_end", "mode", "position_ids", "top1")}
    def dtype(n: str) -> str:
        return kind.get(n, "FLOAT")

    layout = lm_layout(names, list(LM_OUTPUTS), lambda n: False, dtype, "plugin.engine")
    assert not layout.key_end_on_host and layout.dtypes["top1"] == np.int64
    with pytest.raises(PlannerSetupError, match=r"not an lm_step engine of this export \(no v_new\)"):
        lm_layout(names, ["top1", "prob", "k_new"], lambda n: False, dtype, "x.engine")
    with pytest.raises(StaleExportError, match=r"x\.engine: an lm_step engine of the whole-cache KV I/O"):
        lm_layout(names, ["top1", "prob", "present_k", "present_v"], lambda n: False, dtype, "x.engine")
    with pytest.raises(PlannerSetupError, match=r"host \(shape tensor\) inputs \['start', 'key_end'\]"):
        lm_layout(names, list(LM_OUTPUTS), lambda n: n in ("start", "key_end"), dtype, "x.engine")
    with pytest.raises(PlannerSetupError, match="tensor prob is BF16"):
        lm_layout(names, list(LM_OUTPUTS), lambda n: False, lambda n: "BF16" if n == "prob" else dtype(n), "x")


# -- engine selection over a bundle that lists a plugin engine ------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_bundle(graphs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A bundle (written by BundleWriter, loaded and hash-checked) with the decomposed graphs and, for Orin
    (sm 8.7), an fp16 vision engine and a plugin LM engine whose blob is the real plugin graph (selection
    reads the manifest only; nothing here deserializes an engine)."""
    root = tmp_path_factory.mktemp("bundle")
    vision = root / "vision.fp16.engine"
    vision.write_bytes(b"VISION-ENGINE" * 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("blockpilot.formats.bundle.tool_versions", lambda: {"torch": "2.13.0+cpu"})
        with BundleWriter(root / "b", tools={"tensorrt": "10.3.0.30"}) as writer:
            writer.add_model(REFERENCE, weights=False)
            writer.add_graph(graphs["decomposed"], role="lm_step", variant="decomposed", precision="fp32", io={})
            writer.add_graph(graphs["plugin"], role="lm_step", variant="plugin", precision="fp32", io={})
            writer.add_engine(graphs["plugin"], target="orin", sm="8.7", role="lm_step", variant="plugin",
                              precision="fp16", io={})
            writer.add_engine(vision, target="orin", sm="8.7", role="vision", variant="decomposed", precision="fp16",
                              io={})
    return load_bundle(root / "b")


def test_a_plugin_engine_is_selected_when_it_is_what_the_bundle_has(plugin_bundle: Any) -> None:
    chosen = select_engines(plugin_bundle, "8.7")
    assert {r: (a.variant, a.precision, a.sm) for r, a in chosen.items()} == {
        "lm_step": ("plugin", "fp16", "8.7"), "vision": ("decomposed", "fp16", "8.7")}
    assert chosen["lm_step"].tools == {"tensorrt": "10.3.0.30"}  # deserialized by tensorrt proper
    assert select_engines(plugin_bundle, "sm87", variant="plugin") == chosen
    with pytest.raises(EngineSelectionError, match=r"variant native.*lm_step fp16 plugin for orin \(sm 8\.7\)"):
        select_engines(plugin_bundle, "8.7", variant="native")


def test_plugin_ranks_after_native_and_decomposed_but_precision_first(plugin_bundle: Any) -> None:
    lm = select_engines(plugin_bundle, "8.7")["lm_step"]

    def with_engines(*changes: dict[str, str]) -> Any:
        extra = tuple(dataclasses.replace(lm, **c) for c in changes)
        return dataclasses.replace(plugin_bundle, artifacts=plugin_bundle.artifacts + extra)

    def pick(bundle: Any, **kw: str) -> tuple[str, str]:
        a = select_engines(bundle, "8.7", **kw)["lm_step"]
        return a.variant, a.precision

    assert pick(with_engines({"variant": "decomposed"})) == ("decomposed", "fp16")
    assert pick(with_engines({"variant": "decomposed"}, {"variant": "native"})) == ("native", "fp16")
    assert pick(with_engines({"variant": "native", "precision": "fp32"})) == ("plugin", "fp16")
    assert pick(with_engines({"variant": "native"}), variant="plugin") == ("plugin", "fp16")


# -- the plugin registered from the runtime's load path ---------------------------------------------------------------


def test_runtime_load_registers_the_plugin_once_before_deserializing(tmp_path: Path) -> None:
    trt = load_tensorrt(prefer=("tensorrt_rtx",))
    blob = tmp_path / "lm_step.fp16.plugin.engine"
    blob.write_bytes(b"not an engine on a machine without a GPU")
    for _ in range(2):  # the second load finds the creator registered and registers nothing new
        with pytest.raises(PlannerSetupError, match="could not deserialize this engine"):
            TrtEngine.load("tensorrt_rtx", [blob], "8.9", plugin=True)
        creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        assert creator is not None and creator is plugin.register_plugin(trt)
        assert (creator.name, creator.plugin_namespace) == (PLUGIN_NAME, PLUGIN_NAMESPACE)
    names = [c.name for c in trt.get_plugin_registry().all_creators if c.plugin_namespace == PLUGIN_NAMESPACE]
    assert names.count(PLUGIN_NAME) == 1


def test_runtime_load_of_a_missing_flavor_is_an_import_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TrtUnavailableError) as info:
        TrtEngine.load("no_such_tensorrt", [tmp_path / "x.engine"], "8.7", plugin=True)
    assert info.value.name == "no_such_tensorrt"


# -- the plugin engine build: aliasing needs its preview feature ------------------------------------------------------


def test_preview_features_are_set_on_a_real_builder_config() -> None:
    trt = load_tensorrt(prefer=("tensorrt_rtx",))
    assert plugin.preview_features(trt) == ("ALIASED_PLUGIN_IO_10_03",)  # these bindings have IPluginV3OneBuildV2
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    assert not config.get_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03)
    trt_build._enable_preview_features(trt, config, plugin.preview_features(trt))
    assert config.get_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03)
    with pytest.raises(ValueError, match="no preview feature 'WARP_DRIVE'"):
        trt_build._enable_preview_features(trt, config, ["WARP_DRIVE"])


def test_build_plugin_engine_registers_and_asks_for_aliasing(graphs: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The TensorRT-proper path up to the build, with TensorRT-RTX's module standing in (it has the plugin
    classes and registry) and the build itself recorded instead of run."""
    rtx = load_tensorrt(prefer=("tensorrt_rtx",))
    proper = TensorRT(rtx.module, "tensorrt", rtx.version)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(trt_plugin, "build_engine", lambda *a, **kw: calls.append({"args": a, **kw}))
    spec = onnx_spec.load_spec(graphs["plugin"].parent)
    trt_plugin.build_plugin_engine(graphs["plugin"], tmp_path / "p.engine", spec=spec, trt=proper)
    (call,) = calls
    assert call["preview_features"] == ("ALIASED_PLUGIN_IO_10_03",) and call["compute_capability"] is None
    assert set(call["profiles"]) == {"inputs_embeds", "position_ids", "allowed_table", "token_class"}
    assert call["trt"] is proper  # the typed-slot inputs are profiled, so the build keeps them as inputs
    assert rtx.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None
