"""Float32 ONNX graphs rewritten to compute in float16 (``onnx`` package only): TensorRT-RTX networks are
strongly typed, so an fp16 engine needs an fp16 graph."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..formats.onnx_spec import KV_OUTPUTS
from .trt_build import all_nodes

# Kept fp32 by default: softmax (the attention and the top-1 probability), RoPE angles (position * inv_freq
# reaches ~1e3 rad, far past fp16's resolution) and the RMS norms (sum of squares overflows fp16).
KEEP_FP32_OPS = ("Softmax", "Cos", "Sin")
KEEP_FP32_NAMES = ("rotary", "norm")
# The LM step's KV cache I/O, float16 in an fp16 engine (``fp16_io``): the cache the runtime keeps on the device
# in the engine's dtype (half the bytes of float32) and the window's rows it copies into it. The other I/O stays
# float32 on purpose: ``inputs_embeds`` is written from the host's float32 embedding table and image features
# (T rows per step; a Cast inside the engine is cheaper than converting on the host), ``prob`` is read back as
# float32 (its Softmax is kept fp32), and the vision graphs' patches / features cross the host once per frame.
KV_CACHE_IO = ("past_k", "past_v", *KV_OUTPUTS["window"])


def to_fp16_graph(onnx_in: str | Path, onnx_out: str | Path, *, keep_fp32_ops: Iterable[str] = KEEP_FP32_OPS,
                  keep_fp32_names: Iterable[str] = KEEP_FP32_NAMES, fp16_io: Iterable[str] = ()) -> dict[str, int]:
    """Rewrite a float32 graph so it computes in float16, with the ``onnx`` package only.

    Float initializers and constants become float16, ``Cast(to=float)`` becomes ``Cast(to=float16)``. Nodes whose
    op type is in ``keep_fp32_ops`` or whose name contains one of ``keep_fp32_names`` stay float32, with Casts
    inserted where a tensor crosses between the two. Graph inputs and outputs keep their float32 types (a Cast
    right after each input, one right before each output), so the engine's I/O bindings do not change, except
    those named in ``fp16_io`` (float32 graph inputs / outputs, e.g. the LM step's KV cache, :data:`KV_CACHE_IO`):
    they become float16 themselves, with no Cast at the boundary (a Cast to float32 only where a kept-fp32 node
    reads such an input, to float16 where a kept-fp32 node produces such an output). Returns counts of what
    changed (``fp16_io``: how many I/O tensors became float16). Raises ``ValueError`` naming an ``fp16_io`` entry
    that is not a float32 input or output of the graph.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..formats.onnx_external import external_files
    from .external_data import MIN_TENSOR_BYTES, DataWriter, save_structure, tensor_array

    # Structure only: a graph over 2 GB keeps its weights external, converted one tensor at a time.
    model = onnx.load(str(onnx_in), load_external_data=False)
    base = Path(onnx_in).parent
    writer = DataWriter(onnx_out) if external_files(onnx_in) else None
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    if any(n.op_type in ("If", "Loop", "Scan") for n in all_nodes(graph)):
        raise ValueError(f"{onnx_in}: graphs with control-flow subgraphs are not supported by to_fp16_graph")
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    types: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    ops, names = frozenset(keep_fp32_ops), tuple(keep_fp32_names)
    half_io = _half_io(graph, types, fp16_io, onnx_in, f32)
    counts = {"initializers": 0, "constants": 0, "casts_retyped": 0, "casts_inserted": 0, "kept_fp32": 0,
              "fp16_io": len(half_io)}

    for init in graph.initializer:
        if init.data_type != f32 and (writer is None or init.data_location != TensorProto.EXTERNAL):
            if writer is not None and len(init.raw_data) >= MIN_TENSOR_BYTES:
                writer.put(init, init.raw_data)  # into <onnx_out>.data, so the source's file is not needed
            continue
        array = tensor_array(init, base)
        if init.data_type == f32:
            array = array.astype("float16")
            counts["initializers"] += 1
        if writer is not None and array.nbytes >= MIN_TENSOR_BYTES:
            writer.put_array(init, array, f16 if array.dtype == "float16" else None)  # into <onnx_out>.data
        else:
            init.CopyFrom(numpy_helper.from_array(array, init.name))
        del array
    # Where each float tensor's current dtype lives: graph inputs stay f32 (those of fp16_io become f16),
    # initializers are now f16.
    now: dict[str, int] = {i.name: f16 if i.name in half_io else f32 for i in graph.input if types.get(i.name) == f32}
    now.update({i.name: f16 for i in graph.initializer if i.data_type == f16})
    for vi in [*graph.input, *graph.output]:
        if vi.name in half_io:
            vi.type.tensor_type.elem_type = f16
    out_names = {o.name for o in graph.output if types.get(o.name) == f32 and o.name not in half_io}
    rename = {name: f"{name}__fp" for name in out_names}  # producers write here; a final Cast restores the name
    made: dict[tuple[str, int], str] = {}
    new_nodes: list[Any] = []

    def converted(name: str, dtype: int) -> str:
        key = (name, dtype)
        if key not in made:
            made[key] = f"{name}__to{'16' if dtype == f16 else '32'}"
            new_nodes.append(helper.make_node("Cast", [name], [made[key]], to=dtype, name=f"{made[key]}_cast"))
            counts["casts_inserted"] += 1
        return made[key]

    for node in graph.node:
        keep = node.op_type in ops or any(s in node.name for s in names)
        want = f32 if keep else f16
        counts["kept_fp32"] += int(keep)
        for i, name in enumerate(node.input):
            name = rename.get(name, name)
            node.input[i] = name
            if name and now.get(name, want) != want:
                node.input[i] = converted(name, want)
        _retype_node(node, want, counts, numpy_helper, f32, base, writer)
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
            if types.get(name) == f32:
                now[node.output[i]] = want
        new_nodes.append(node)
    for name in out_names:
        src = rename[name]
        new_nodes.append(helper.make_node("Cast", [src], [name], to=f32, name=f"{name}_to_fp32"))
        now[name] = f32
    for name in (o.name for o in graph.output if o.name in half_io and now.get(o.name) == f32):
        # A kept-fp32 node produces this float16 output: it writes name__fp32, a Cast makes the output.
        src = f"{name}__fp32"
        for node in new_nodes:
            node.output[:] = [src if n == name else n for n in node.output]
            node.input[:] = [src if n == name else n for n in node.input]
        new_nodes.append(helper.make_node("Cast", [src], [name], to=f16, name=f"{name}_to_fp16"))
        counts["casts_inserted"] += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale float32 annotations; TensorRT and the checker infer them again
    if writer is None:
        onnx.checker.check_model(model)
        onnx.save(model, str(onnx_out))
    else:
        writer.close(keep=True)
        save_structure(model, onnx_out)
        onnx.checker.check_model(str(onnx_out))
    return counts


def _half_io(graph: Any, types: dict[str, int], fp16_io: Iterable[str], where: str | Path, f32: int) -> frozenset[str]:
    """The graph I/O names of ``fp16_io``, each checked to be a float32 input or output of ``graph``."""
    wanted = frozenset(fp16_io)
    io = {vi.name for vi in [*graph.input, *graph.output] if types.get(vi.name) == f32}
    stray = sorted(wanted - io)
    if stray:
        raise ValueError(f"{where}: fp16_io names {stray}, which are not float32 inputs or outputs of the graph "
                         f"(its float32 I/O: {sorted(io)})")
    return wanted


def _retype_node(node: Any, want: int, counts: dict[str, int], numpy_helper: Any, f32: int, base: Path,
                 writer: Any) -> None:
    """Retarget the attributes that fix a node's float output type (Cast ``to``, Constant ``value``). A constant
    value stored externally (torch writes big ones to files in a graph over 2 GB) is read from ``base`` and written
    into ``writer``'s data file, converted or not, so the output does not depend on the source's data file."""
    from onnx import AttributeProto, TensorProto

    from .external_data import MIN_TENSOR_BYTES, tensor_array

    for attr in node.attribute:
        if want != f32 and node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
            attr.i = want
            counts["casts_retyped"] += 1
            continue
        if attr.type != AttributeProto.TENSOR:
            continue
        convert = (want != f32 and node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value"
                   and attr.t.data_type == f32)
        external = attr.t.data_location == TensorProto.EXTERNAL
        if not (convert or (external and writer is not None)):
            continue
        value = tensor_array(attr.t, base)
        if convert:
            value = value.astype("float16")
            counts["constants"] += 1
        if writer is not None and value.nbytes >= MIN_TENSOR_BYTES:
            writer.put_array(attr.t, value, TensorProto.FLOAT16 if convert else None)
        else:
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))

