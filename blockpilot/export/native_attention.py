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
    """One decomposed attention chain found in the graph."""

    q: str
    k: str
    v: str
    mask: str
    scale: float
    output: str
    layer: int
    boolean: bool
    grouped: bool


def _constant_value(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a ``Constant`` node output, else ``None``."""
    from onnx import numpy_helper

    if name in inits:
        return np.asarray(numpy_helper.to_array(inits[name]))
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return np.asarray(numpy_helper.to_array(attr.t))
    return None


def _fill_value(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> float | None:
    """The single value a tensor is filled with (``ConstantOfShape`` or a uniform constant), else ``None``."""
    from onnx import numpy_helper

    node = producers.get(name)
    if node is not None and node.op_type == "ConstantOfShape":
        for attr in node.attribute:
            if attr.name == "value":
                return float(numpy_helper.to_array(attr.t).reshape(-1)[0])
        return 0.0
    value = _constant_value(name, producers, inits)
    if value is not None and value.size > 0 and np.all(value == value.reshape(-1)[0]):
        return float(value.reshape(-1)[0])
    return None


def _unrepeat(name: str, producers: dict[str, Any]) -> str | None:
    """The K/V tensor before a ``Unsqueeze -> Tile -> Reshape`` (or ``Expand``) head repeat, else ``None``."""
    reshape = producers.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        return None
    tile = producers.get(reshape.input[0])
    if tile is None or tile.op_type not in ("Tile", "Expand"):
        return None
    unsq = producers.get(tile.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    return str(unsq.input[0])


def _boolean_mask(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> str | None:
    """``allowed`` when ``name`` is ``Where(allowed, 0, -inf)``, else ``None``."""
    node = producers.get(name)
    if node is None or node.op_type != "Where":
        return None
    on, off = _fill_value(node.input[1], producers, inits), _fill_value(node.input[2], producers, inits)
    if on == 0.0 and off is not None and math.isinf(off) and off < 0:
        return str(node.input[0])
    return None


def _find(graph: Any, gqa: bool, boolean: bool) -> list[tuple[_Match, list[Any]]]:
    """Every decomposed attention chain with the nodes it replaces, in graph order."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {init.name: init for init in graph.initializer}
    found: list[tuple[_Match, list[Any]]] = []
    for softmax in graph.node:
        if softmax.op_type != "Softmax":
            continue
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        users = consumers.get(softmax.output[0], [])
        add = producers.get(softmax.input[0])
        if axis not in (-1, 3) or len(users) != 1 or users[0].op_type != "MatMul" or add is None \
                or add.op_type != "Add":
            continue
        out_mm = users[0]
        if out_mm.input[0] != softmax.output[0]:
            continue
        scaled, mask = add.input[0], add.input[1]
        scaler = producers.get(scaled)
        if scaler is None or scaler.op_type not in ("Mul", "Div"):
            scaled, mask = mask, scaled
            scaler = producers.get(scaled)
        if scaler is None or scaler.op_type not in ("Mul", "Div"):
            continue
        factor = _constant_value(scaler.input[1], producers, inits)
        qk_name = scaler.input[0]
        if factor is None and scaler.op_type == "Mul":
            factor, qk_name = _constant_value(scaler.input[0], producers, inits), scaler.input[1]
        qk = producers.get(qk_name)
        if factor is None or factor.size != 1 or qk is None or qk.op_type != "MatMul":
            continue
        scale = float(factor.reshape(-1)[0]) if scaler.op_type == "Mul" else 1.0 / float(factor.reshape(-1)[0])
        k_t = producers.get(qk.input[1])
        if k_t is None or k_t.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in k_t.attribute if a.name == "perm"), [])
        if perm != [0, 1, 3, 2]:
            continue
        k, v = k_t.input[0], out_mm.input[1]
        grouped = False
        if gqa:
            k_src, v_src = _unrepeat(k, producers), _unrepeat(v, producers)
            if k_src is not None and v_src is not None:
                k, v, grouped = k_src, v_src, True
        bool_mask = _boolean_mask(mask, producers, inits) if boolean else None
        match = _Match(q=qk.input[0], k=k, v=v, mask=bool_mask or mask, scale=scale, output=out_mm.output[0],
                       layer=len(found), boolean=bool_mask is not None, grouped=grouped)
        found.append((match, [k_t, qk, scaler, add, softmax, out_mm]))
    return found


def _prune(graph: Any) -> int:
    """Drop nodes whose outputs nothing reads (graph outputs count as read); returns how many went."""
    needed = {o.name for o in graph.output}
    keep: list[Any] = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output if out):
            keep.append(node)
            needed.update(name for name in node.input if name)
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = needed
    inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return removed


def to_native_attention(onnx_in: str | Path, onnx_out: str | Path, *, gqa: bool = True,
                        boolean_mask: bool = True, full_check: bool = True) -> dict[str, Any]:
    """Write ``onnx_out``: ``onnx_in`` at opset 23 with each decomposed attention as one ``Attention`` node.

    Returns counts: ``attention_nodes`` (created), ``per_layer`` (one entry per layer, its scale and whether the
    mask is boolean and the K/V grouped), ``nodes_before`` / ``nodes_after``, ``nodes_removed`` (the replaced
    chains plus what became dead, e.g. the head repeats and the additive mask), ``opset``.
    Raises ``ValueError`` when no attention chain is found.
    """
    import onnx
    from onnx import helper, version_converter

    from .external_data import save_structure, share_external_data

    # Structure only (weights stay in the graph's external file): the opset conversion and the rewrite never
    # serialize the weights, so graphs over protobuf's 2 GB limit convert too.
    model = onnx.load(str(onnx_in), load_external_data=False)
    nodes_before = len(model.graph.node)
    if not any(op.domain in ("", "ai.onnx") and op.version >= NATIVE_OPSET for op in model.opset_import):
        model = version_converter.convert_version(model, NATIVE_OPSET)
    graph = model.graph
    matches = _find(graph, gqa, boolean_mask)
    if not matches:
        raise ValueError(f"{onnx_in}: no MatMul -> scale -> Add(mask) -> Softmax -> MatMul attention found")
    replaced = {id(node) for _, chain in matches for node in chain}
    anchor = {id(chain[-1]): match for match, chain in matches}
    new_nodes: list[Any] = []
    per_layer: list[dict[str, Any]] = []
    for node in graph.node:
        match = anchor.get(id(node))
        if match is not None:
            new_nodes.append(helper.make_node("Attention", [match.q, match.k, match.v, match.mask], [match.output],
                                              name=f"/native_attention_{match.layer}", scale=match.scale))
            per_layer.append({"layer": match.layer, "node": f"/native_attention_{match.layer}",
                              "scale": match.scale, "boolean_mask": match.boolean, "grouped_kv": match.grouped})
        elif id(node) not in replaced:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale shapes of removed tensors; inference redoes them
    pruned = _prune(graph)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", NATIVE_OPSET)])
    model = onnx.shape_inference.infer_shapes(model)
    Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
    share_external_data(onnx_in, onnx_out)
    save_structure(model, onnx_out)
    onnx.checker.check_model(str(onnx_out), full_check=full_check)
    nodes_after = len(model.graph.node)
    return {"attention_nodes": len(matches), "per_layer": per_layer, "nodes_before": nodes_before,
            "nodes_after": nodes_after, "nodes_removed": nodes_before - nodes_after + len(matches),
            "chain_nodes_replaced": len(replaced), "dead_nodes_pruned": pruned, "opset": NATIVE_OPSET}


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
