"""Rewrite the decomposed attention of ``lm_step.onnx`` into standard ONNX ``Attention`` nodes (opset 23).

:func:`blockpilot.export.onnx_graphs.export_onnx` writes each decoder layer's attention as
``MatMul(Q, Transpose(K)) -> Mul(scale) -> Add(mask) -> Softmax -> MatMul(V)``, with the grouped-query K/V heads
repeated by ``Unsqueeze -> Tile -> Reshape`` and one additive mask ``Where(allowed, 0, -inf)`` shared by every
layer. :func:`to_native_attention` converts the graph to opset 23 and replaces each such chain by ONE
``Attention`` node that reads the 4-D ``(1, heads, T, head_dim)`` query and the visible keys and values:

* the mask becomes the BOOLEAN ``allowed`` tensor ``(T, key_end)`` (``True`` = attend) when the additive mask is
  recognised as ``Where(allowed, 0, -inf)``; otherwise the float mask is passed as is (the op accepts both);
* with ``gqa=True`` the op gets the ``kv_heads`` K/V before the head repeat (the op groups the heads itself);
  ``gqa=False`` keeps the repeated K/V (plain multi-head attention);
* the scale constant of the ``Mul`` (or ``1 / divisor`` of a ``Div``) becomes the ``scale`` attribute.

Everything else of the graph (cache writes, RoPE, the MLPs, the top-1 head) is unchanged, so the I/O and the
``onnx_spec.json`` of the export stay valid. Nodes left without consumers are removed afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .trt_build import BuildReport, build_engine, check_buildable, load_tensorrt, parse_network

NATIVE_OPSET = 23


@dataclass(frozen=True)
class _Match:
    """One decomposed attention chain found in the graph (onnx-graphsurgeon tensors and nodes)."""

    q: Any
    k: Any
    v: Any
    mask: Any
    scale: float
    out_mm: Any  # the chain's last MatMul: the Attention node takes its place and its output
    boolean: bool
    grouped: bool


def _producer(tensor: Any, op: str | tuple[str, ...]) -> Any:
    """The node that makes ``tensor`` when its op is ``op`` (one of ``op``), else ``None``."""
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and node.op in ((op,) if isinstance(op, str) else op) else None


def _constant_value(tensor: Any) -> np.ndarray | None:
    """The value of ``tensor`` when it is an initializer or a ``Constant`` node output, else ``None``."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor, "Constant")
    value = None if node is None else node.attrs.get("value")
    return np.asarray(value.values) if isinstance(value, gs.Constant) else None


def _fill_value(tensor: Any) -> float | None:
    """The single value a tensor is filled with (``ConstantOfShape`` or a uniform constant), else ``None``."""
    node = _producer(tensor, "ConstantOfShape")
    if node is not None:
        value = node.attrs.get("value")
        return 0.0 if value is None else float(np.asarray(value.values).reshape(-1)[0])
    array = _constant_value(tensor)
    if array is not None and array.size > 0 and np.all(array == array.reshape(-1)[0]):
        return float(array.reshape(-1)[0])
    return None


def _unrepeat(tensor: Any) -> Any:
    """The K/V tensor before a ``Unsqueeze -> Tile -> Reshape`` (or ``Expand``) head repeat, else ``None``."""
    reshape = _producer(tensor, "Reshape")
    tile = reshape and _producer(reshape.inputs[0], ("Tile", "Expand"))
    unsqueeze = tile and _producer(tile.inputs[0], "Unsqueeze")
    return unsqueeze.inputs[0] if unsqueeze else None


def _boolean_mask(tensor: Any) -> Any:
    """``allowed`` when ``tensor`` is ``Where(allowed, 0, -inf)``, else ``None``."""
    where = _producer(tensor, "Where")
    if where is None:
        return None
    on, off = _fill_value(where.inputs[1]), _fill_value(where.inputs[2])
    return where.inputs[0] if on == 0.0 and off is not None and math.isinf(off) and off < 0 else None


def _match(softmax: Any, gqa: bool, boolean: bool) -> _Match | None:
    """The chain ``MatMul(Q, Transpose(K)) -> Mul/Div(scale) -> Add(mask) -> Softmax -> MatMul(V)`` that ends
    at ``softmax``'s consumer, else ``None``."""
    users = softmax.outputs[0].outputs
    add = _producer(softmax.inputs[0], "Add")
    if softmax.attrs.get("axis", -1) not in (-1, 3) or len(users) != 1 or users[0].op != "MatMul" or add is None:
        return None
    out_mm = users[0]
    if out_mm.inputs[0] is not softmax.outputs[0]:
        return None
    scaled, mask = add.inputs[0], add.inputs[1]
    scaler = _producer(scaled, ("Mul", "Div"))
    if scaler is None:
        scaled, mask = mask, scaled
        scaler = _producer(scaled, ("Mul", "Div"))
    if scaler is None:
        return None
    factor, qk_tensor = _constant_value(scaler.inputs[1]), scaler.inputs[0]
    if factor is None and scaler.op == "Mul":
        factor, qk_tensor = _constant_value(scaler.inputs[0]), scaler.inputs[1]
    qk = _producer(qk_tensor, "MatMul")
    if factor is None or factor.size != 1 or qk is None:
        return None
    scale = float(factor.reshape(-1)[0]) if scaler.op == "Mul" else 1.0 / float(factor.reshape(-1)[0])
    k_t = _producer(qk.inputs[1], "Transpose")
    if k_t is None or list(k_t.attrs.get("perm", [])) != [0, 1, 3, 2]:
        return None
    k, v, grouped = k_t.inputs[0], out_mm.inputs[1], False
    if gqa:
        k_src, v_src = _unrepeat(k), _unrepeat(v)
        if k_src is not None and v_src is not None:
            k, v, grouped = k_src, v_src, True
    bool_mask = _boolean_mask(mask) if boolean else None
    return _Match(q=qk.inputs[0], k=k, v=v, mask=mask if bool_mask is None else bool_mask, scale=scale,
                  out_mm=out_mm, boolean=bool_mask is not None, grouped=grouped)


def to_native_attention(onnx_in: str | Path, onnx_out: str | Path, *, gqa: bool = True,
                        boolean_mask: bool = True, full_check: bool = True) -> dict[str, Any]:
    """Write ``onnx_out``: ``onnx_in`` at opset 23 with each decomposed attention as one ``Attention`` node.

    The rewrite runs on onnx-graphsurgeon's graph: each chain's last ``MatMul`` hands its output to the new
    node in its place, and ``cleanup`` drops what became dead (the chains, the head repeats, the additive
    mask and their unused initializers).

    Returns counts: ``attention_nodes`` (created), ``per_layer`` (one entry per layer, its scale and whether the
    mask is boolean and the K/V grouped), ``nodes_before`` / ``nodes_after``, ``nodes_removed`` (the replaced
    chains plus what became dead, e.g. the head repeats and the additive mask), ``opset``.
    Raises ``ValueError`` when no attention chain is found.
    """
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import version_converter

    from .external_data import save_structure, share_external_data

    # Structure only (weights stay in the graph's external file): the opset conversion and the rewrite never
    # serialize the weights (graphsurgeon passes external initializers through as they are), so graphs over
    # protobuf's 2 GB limit convert too.
    model = onnx.load(str(onnx_in), load_external_data=False)
    nodes_before = len(model.graph.node)
    if not any(op.domain in ("", "ai.onnx") and op.version >= NATIVE_OPSET for op in model.opset_import):
        model = version_converter.convert_version(model, NATIVE_OPSET)
    inputs = list(model.graph.input)  # graphsurgeon drops inputs that have an initializer (the typed-slot tables)
    graph = gs.import_onnx(model)
    matches = [m for node in graph.nodes if node.op == "Softmax" and (m := _match(node, gqa, boolean_mask))]
    if not matches:
        raise ValueError(f"{onnx_in}: no MatMul -> scale -> Add(mask) -> Softmax -> MatMul attention found")
    per_layer: list[dict[str, Any]] = []
    for layer, match in enumerate(matches):
        name = f"/native_attention_{layer}"
        output = match.out_mm.outputs[0]
        match.out_mm.outputs.clear()  # the MatMul (and with it the chain) is now dead; cleanup removes it
        node = gs.Node("Attention", name=name, attrs={"scale": match.scale},
                       inputs=[match.q, match.k, match.v, match.mask], outputs=[output])
        graph.nodes.insert(graph.nodes.index(match.out_mm), node)
        per_layer.append({"layer": layer, "node": name, "scale": match.scale, "boolean_mask": match.boolean,
                          "grouped_kv": match.grouped})
    chain_nodes = 6 * len(matches)  # Transpose, MatMul, Mul/Div, Add, Softmax, MatMul per layer
    nodes_replaced = len(graph.nodes)
    graph.cleanup()
    pruned = nodes_replaced - len(graph.nodes) - chain_nodes
    graph.opset = NATIVE_OPSET
    rewritten = gs.export_onnx(graph, do_type_check=False)
    del rewritten.graph.input[:]
    rewritten.graph.input.extend(inputs)
    del rewritten.graph.value_info[:]  # stale shapes of removed tensors; inference redoes them
    model.graph.CopyFrom(rewritten.graph)  # keeps the model's own fields (IR version, producer, metadata)
    del model.opset_import[:]
    model.opset_import.extend(rewritten.opset_import)
    model = onnx.shape_inference.infer_shapes(model)
    Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
    share_external_data(onnx_in, onnx_out)
    save_structure(model, onnx_out)
    onnx.checker.check_model(str(onnx_out), full_check=full_check)
    nodes_after = len(model.graph.node)
    return {"attention_nodes": len(matches), "per_layer": per_layer, "nodes_before": nodes_before,
            "nodes_after": nodes_after, "nodes_removed": nodes_before - nodes_after + len(matches),
            "chain_nodes_replaced": chain_nodes, "dead_nodes_pruned": pruned, "opset": NATIVE_OPSET}


def attention_layer_types(onnx_path: str | Path) -> dict[str, int]:
    """How many layers of each ``trt.LayerType`` the TensorRT ONNX parser makes of ``onnx_path`` (no build);
    each ``Attention`` node shows up as one ``ATTENTION_INPUT`` plus one ``ATTENTION_OUTPUT`` layer."""
    trt = load_tensorrt()
    check_buildable(onnx_path, trt.flavor)
    _, network = parse_network(trt, trt.Logger(trt.Logger.ERROR), Path(onnx_path))
    return _layer_types(trt, network, None)


@dataclass(frozen=True)
class NativeBuild:
    """What :func:`build_native_engine` built: the engine, its size and time, and the parsed network's layers."""

    engine: Path
    seconds: float
    engine_bytes: int
    compute_capability: str
    network_layers: int
    attention_layers: int
    decomposable: bool
    layer_types: dict[str, int]
    build: BuildReport | None = None  # the full report (inspector, network summary, timing cache)


def build_native_engine(onnx_path: str | Path, engine_path: str | Path, *, profiles: Any = None,
                        compute_capability: str | None = "8.9", decomposable: bool = True,
                        timing_cache: Path | None = None) -> NativeBuild:
    """Build a graph of :func:`to_native_attention` like :func:`blockpilot.export.trt_build.build_engine`, with
    each parsed ``IAttention`` marked ``decomposable`` first.

    TensorRT-RTX has dedicated fused-attention kernels for fp16/bf16 only; a float32 ``Attention`` fails the build
    ("Attention operation was not supported by a dedicated kernel") unless the layer may be decomposed back into
    MatMul/Softmax. An fp16 graph (:func:`blockpilot.export.trt_build.to_fp16_graph`) builds either way.
    """
    types: dict[str, int] = {}

    def mark(trt: Any, network: Any) -> None:
        types.update(_layer_types(trt, network, decomposable))

    report = build_engine(onnx_path, engine_path, profiles=profiles, compute_capability=compute_capability,
                          network_hook=mark, timing_cache=timing_cache)
    return NativeBuild(report.engine, report.seconds, report.engine_bytes, report.compute_capability,
                       report.network_layers, types.get("ATTENTION_INPUT", 0), decomposable, types, report)


def _layer_types(trt: Any, network: Any, decomposable: bool | None) -> dict[str, int]:
    """Count the network's layer types; with ``decomposable`` set, set it on every ``IAttention`` too."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).split(".")[-1]
        counts[kind] = counts.get(kind, 0) + 1
        if decomposable is not None and layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer  # the binding hands out plain ILayer; downcast to reach it
            layer.attention.decomposable = decomposable
    return counts
