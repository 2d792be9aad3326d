"""The ``plugin`` variant of ``lm_step.onnx``: each layer's KV-cache write + attention as ONE custom node.

Node contract (domain ``blockpilot``, op ``BlockDiffusionAttention``, opset 1), shared with the TensorRT plugin
of :mod:`blockpilot.trt.plugin` (the names: :mod:`blockpilot.formats.onnx_spec`):

inputs
    ``q`` ``(1, H, T, D)`` and ``k_new`` / ``v_new`` ``(1, Hkv, T, D)``: the window's projections after RoPE, in
    the graph's float type; ``past_k`` / ``past_v`` ``(1, Hkv, C, D)``: this layer's slice of the cache;
    ``start``, ``key_end``, ``mode``: int32 ``(1,)`` tensors, made once in the graph from the int64 scalar
    inputs by ``Cast`` + ``Reshape`` (TensorRT plugins take INT32 linear tensors; a ``(1,)`` shape keeps them
    ordinary device tensors, never shape tensors).
outputs
    ``attn`` ``(1, H, T, D)``: attention of the window's queries over slots ``[0, key_end)`` allowed by ``mode``
    (0 causal, 1 block, 2 bidirectional; :mod:`blockpilot.kernels.reference`); ``present_k`` / ``present_v``:
    the layer's cache with the window written at ``start`` (the plugin may alias them to the pasts).
attributes
    ``plugin_namespace`` and ``plugin_version`` (strings TensorRT's ONNX parser reads to find the creator; the
    op type is the plugin name), ``num_heads``, ``num_kv_heads``, ``head_dim``, ``block_size`` (ints),
    ``scale`` (float).

Route: the exporter itself emits the node. ``LMStep(attention="plugin")`` calls :func:`plugin_attention`, a
``torch.autograd.Function`` whose ``forward`` is the torch reference (so tracing computes real values and
shapes) and whose ``symbolic`` writes the custom node. The rest of the graph (RoPE, MLPs, the top-1 head, the
graph I/O) comes from the same trace as the decomposed export. A rewrite of the exported decomposed graph would
have to pattern-match the cache write (``Where``/``Gather`` over slots) and the shared mask as well as the
attention chain, which is brittle; emitting the node at the source is not.

The shipped graph carries no body for the op: TensorRT maps it to the plugin. :func:`with_reference_function`
adds a model-local ONNX function (standard ops) for the op so ONNX Runtime can run a copy in tests; TensorRT
would inline such a function instead of calling the plugin, so never ship that copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic_io import atomic_write
from ..formats.onnx_spec import (  # the node's constants belong to the graph format; re-exported here
    LM_FILE,
    PLUGIN_DOMAIN,
    PLUGIN_INPUTS,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_OPSET,
    PLUGIN_OUTPUTS,
    PLUGIN_VERSION,
    SPEC_FILE,
)
from ..kernels.reference import block_diffusion_attention_ref, write_window

if TYPE_CHECKING:
    from ..vla.model import VLAModel

__all__ = ["PLUGIN_DOMAIN", "PLUGIN_INPUTS", "PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_OPSET", "PLUGIN_OUTPUTS",
           "PLUGIN_VERSION", "export_plugin_graph", "plugin_attention", "plugin_nodes", "plugin_scalars",
           "with_reference_function"]


@contextmanager
def _untraced() -> Iterator[None]:
    """Pause the TorchScript tracer: the exporter needs only the values and shapes of the op's outputs (the
    symbolic writes the node), and a traced reference body (int slot arithmetic on traced sizes) trips the
    exporter's peephole pass."""
    set_state = torch._C._set_tracing_state  # type: ignore[attr-defined]  # private, untyped; stable since 1.x
    state = torch._C._get_tracing_state()
    set_state(None)
    try:
        yield
    finally:
        set_state(state)


class _BlockDiffusionAttention(torch.autograd.Function):
    """Forward: the torch reference. Export: one ``blockpilot::BlockDiffusionAttention`` node."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, start: torch.Tensor, key_end: torch.Tensor, mode: torch.Tensor,
                num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _untraced():
            present_k, present_v = write_window(past_k, k_new, start), write_window(past_v, v_new, start)
            attn = block_diffusion_attention_ref(q, present_k, present_v, start, key_end, mode, block_size,
                                                 scale).to(q.dtype)
        return attn, present_k, present_v

    @staticmethod
    def symbolic(g: Any, q: Any, k_new: Any, v_new: Any, past_k: Any, past_v: Any, start: Any, key_end: Any,
                 mode: Any, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 scale: float) -> tuple[Any, Any, Any]:
        attn, present_k, present_v = g.op(
            f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}", q, k_new, v_new, past_k, past_v, start, key_end, mode,
            plugin_namespace_s=PLUGIN_NAMESPACE, plugin_version_s=PLUGIN_VERSION, num_heads_i=num_heads,
            num_kv_heads_i=num_kv_heads, head_dim_i=head_dim, block_size_i=block_size, scale_f=scale, outputs=3)
        attn.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return attn, present_k, present_v


def plugin_scalars(start: torch.Tensor, key_end: torch.Tensor,
                   mode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The graph's int64 scalars as the plugin's int32 ``(1,)`` inputs (traced as ``Cast`` + ``Reshape``)."""
    return start.to(torch.int32).reshape(1), key_end.to(torch.int32).reshape(1), mode.to(torch.int32).reshape(1)


def plugin_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, past_k: torch.Tensor,
                     past_v: torch.Tensor, start: torch.Tensor, key_end: torch.Tensor, mode: torch.Tensor, *,
                     block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(attn, present_k, present_v)`` of one layer (shapes in the module docstring); exported as one node."""
    heads, kv_heads, head_dim = int(q.shape[1]), int(k_new.shape[1]), int(q.shape[3])
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = _BlockDiffusionAttention.apply(
        q, k_new, v_new, past_k, past_v, start, key_end, mode, heads, kv_heads, head_dim, int(block_size),
        float(scale))
    return out


def export_plugin_graph(model: VLAModel, out_dir: str | Path, capacity: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`blockpilot.export.onnx_graphs.export_onnx` with ``attention="plugin"`` (``kwargs`` go there too):
    the same files and graph I/O, ``lm_step.onnx`` holding one plugin node per layer. The spec (returned and
    rewritten in ``onnx_spec.json``) gains ``"variant": "plugin"`` and a ``"plugin"`` entry naming the op."""
    from .onnx_graphs import export_onnx

    spec = export_onnx(model, out_dir, capacity, attention="plugin", **kwargs)
    nodes = plugin_nodes(Path(out_dir) / LM_FILE)
    layers = model.config.lm.num_layers
    if len(nodes) != layers:
        raise RuntimeError(f"expected {layers} {PLUGIN_NAME} nodes (one per layer), the export has {len(nodes)}")
    spec["variant"] = "plugin"
    spec["plugin"] = {"domain": PLUGIN_DOMAIN, "op_type": PLUGIN_NAME, "version": PLUGIN_VERSION,
                      "namespace": PLUGIN_NAMESPACE, "nodes": len(nodes), "inputs": list(PLUGIN_INPUTS),
                      "outputs": list(PLUGIN_OUTPUTS), "scalar_inputs": {"dtype": "int32", "shape": [1]}}
    atomic_write(Path(out_dir) / SPEC_FILE, json.dumps(spec, indent=2) + "\n")
    return spec


def _attr_value(attr: Any) -> Any:
    from onnx import helper

    value = helper.get_attribute_value(attr)
    return value.decode() if isinstance(value, bytes) else value


def plugin_nodes(onnx_path: str | Path | Any) -> list[dict[str, Any]]:
    """Every ``BlockDiffusionAttention`` node of a graph (a path or a ``ModelProto``), in graph order:
    ``{"name", "domain", "inputs", "outputs", "attrs"}`` with the attributes decoded to Python values."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False) if isinstance(onnx_path, str | Path) \
        else onnx_path
    return [{"name": n.name, "domain": n.domain, "inputs": list(n.input), "outputs": list(n.output),
             "attrs": {a.name: _attr_value(a) for a in n.attribute}}
            for n in model.graph.node if n.op_type == PLUGIN_NAME and n.domain == PLUGIN_DOMAIN]


def _reference_body() -> list[Any]:
    """The op in standard ONNX ops (opset 17): the window write by slot, then the masked softmax attention with
    the query heads grouped per K/V head. ``block_size`` and ``scale`` are read from the calling node's
    attributes; everything else comes from the input shapes."""
    from onnx import AttributeProto, TensorProto, helper

    n = helper.make_node

    def ints(name: str, values: list[int]) -> Any:
        return n("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    def from_attr(name: str, field: str, ref: str, kind: int) -> Any:
        node = n("Constant", [], [name])
        node.attribute.extend([AttributeProto(name=field, ref_attr_name=ref, type=kind)])  # type: ignore[arg-type]
        return node

    return [
        ints("i0", [0]), ints("i1", [1]), ints("i2", [2]), ints("i3", [3]), ints("i_neg1", [-1]),
        ints("win_axes", [0, 1, 3]), ints("td_start", [2]), ints("td_end", [4]),
        n("Squeeze", ["i0"], ["s0"]), n("Squeeze", ["i1"], ["s1"]),
        from_attr("block32", "value_int", "block_size", AttributeProto.INT),
        n("Cast", ["block32"], ["block"], to=TensorProto.INT64),
        from_attr("scale32", "value_float", "scale", AttributeProto.FLOAT),
        n("Constant", [], ["neg_inf32"], value_float=float("-inf")),
        n("Cast", ["start"], ["start64"], to=TensorProto.INT64), n("Squeeze", ["start64"], ["start_s"]),
        n("Cast", ["key_end"], ["end64"], to=TensorProto.INT64), n("Squeeze", ["end64"], ["end_s"]),
        n("Cast", ["mode"], ["mode64"], to=TensorProto.INT64),
        n("Shape", ["q"], ["q_shape"]), n("Shape", ["past_k"], ["cache_shape"]), n("Shape", ["k_new"], ["kv_shape"]),
        n("Gather", ["q_shape", "i2"], ["t1"], axis=0), n("Squeeze", ["t1"], ["t_s"]),
        n("Gather", ["cache_shape", "i2"], ["c1"], axis=0), n("Squeeze", ["c1"], ["c_s"]),
        # cache slot c takes window row c - start when 0 <= c - start < T
        n("Range", ["s0", "c_s", "s1"], ["slots"]), n("Sub", ["slots", "start_s"], ["rel"]),
        n("GreaterOrEqual", ["rel", "s0"], ["rel_ge0"]), n("Less", ["rel", "t_s"], ["rel_lt_t"]),
        n("And", ["rel_ge0", "rel_lt_t"], ["in_window"]), n("Unsqueeze", ["in_window", "win_axes"], ["in_window4"]),
        n("Sub", ["t_s", "s1"], ["t_last"]), n("Max", ["rel", "s0"], ["rel_lo"]),
        n("Min", ["rel_lo", "t_last"], ["rows"]),
        n("Gather", ["k_new", "rows"], ["k_rows"], axis=2), n("Gather", ["v_new", "rows"], ["v_rows"], axis=2),
        n("Where", ["in_window4", "k_rows", "past_k"], ["present_k"]),
        n("Where", ["in_window4", "v_rows", "past_v"], ["present_v"]),
        # visible keys [0, key_end); the mode's rule by slot as an additive mask (T, key_end)
        n("Range", ["s0", "end_s", "s1"], ["k_slots"]),
        n("Gather", ["present_k", "k_slots"], ["keys"], axis=2),
        n("Gather", ["present_v", "k_slots"], ["values"], axis=2),
        n("Range", ["s0", "t_s", "s1"], ["offsets"]), n("Add", ["offsets", "start_s"], ["q_slots"]),
        n("Unsqueeze", ["q_slots", "i1"], ["q_col"]), n("Unsqueeze", ["k_slots", "i0"], ["k_row"]),
        n("LessOrEqual", ["k_row", "q_col"], ["causal"]),
        n("Div", ["k_row", "block"], ["k_block"]), n("Div", ["q_col", "block"], ["q_block"]),
        n("LessOrEqual", ["k_block", "q_block"], ["same_or_earlier_block"]),
        n("Equal", ["mode64", "i0"], ["is_causal"]), n("Equal", ["mode64", "i1"], ["is_block"]),
        n("Equal", ["mode64", "i2"], ["is_bidirectional"]),
        n("And", ["is_causal", "causal"], ["ok_causal"]), n("And", ["is_block", "same_or_earlier_block"], ["ok_block"]),
        n("Or", ["ok_causal", "ok_block"], ["ok_01"]), n("Or", ["ok_01", "is_bidirectional"], ["allowed"]),
        n("CastLike", ["neg_inf32", "q"], ["neg_inf"]),
        n("CastLike", ["s0", "q"], ["zero_f"]), n("CastLike", ["scale32", "q"], ["scale"]),
        n("Where", ["allowed", "zero_f", "neg_inf"], ["mask"]),
        # grouped heads: q (1, H, T, D) -> (1, Hkv, H / Hkv, T, D) against K/V (1, Hkv, 1, K, D)
        n("Gather", ["kv_shape", "i1"], ["kv_heads"], axis=0),
        n("Slice", ["q_shape", "td_start", "td_end"], ["td"]),
        n("Concat", ["i1", "kv_heads", "i_neg1", "td"], ["grouped_shape"], axis=0),
        n("Reshape", ["q", "grouped_shape"], ["q5"]),
        n("Unsqueeze", ["keys", "i2"], ["k5"]), n("Unsqueeze", ["values", "i2"], ["v5"]),
        n("Transpose", ["k5"], ["k5_t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q5", "k5_t"], ["qk"]), n("Mul", ["qk", "scale"], ["scaled"]),
        n("Add", ["scaled", "mask"], ["scores"]), n("Softmax", ["scores"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v5"], ["out5"]), n("Reshape", ["out5", "q_shape"], ["attn"]),
    ]


def with_reference_function(model: Any, opset: int = 17) -> Any:
    """A copy of a plugin graph (``ModelProto``) with a model-local ONNX function for the op, built from standard
    ops, so ONNX Runtime can run it: a test harness that checks the node wiring against the decomposed graph.
    The shipped plugin graph has no such body on purpose: TensorRT would inline it instead of using the plugin."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    function = helper.make_function(
        PLUGIN_DOMAIN, PLUGIN_NAME, list(PLUGIN_INPUTS), list(PLUGIN_OUTPUTS), _reference_body(),
        [helper.make_opsetid("", opset)],
        attributes=["plugin_namespace", "plugin_version", "num_heads", "num_kv_heads", "head_dim", "block_size",
                    "scale"])
    del out.functions[:]
    out.functions.extend([function])
    return out
