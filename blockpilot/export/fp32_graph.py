"""A graph traced in bfloat16 / float16 rewritten to compute in float32, streaming its weights.

``blockpilot export`` traces the model in the checkpoint's stored dtype, so the process never holds a float32 copy of
the model. ONNX Runtime's CPU provider has no bfloat16 kernels and runs float16 graphs with float32 initializers
beside them, so the bundle's graphs are float32: this pass widens every float tensor of the traced graph to float32
(bfloat16 and float16 -> float32 is exact, so the graph computes with exactly the checkpoint's weights), which leaves
the graph the shape of one traced from a float32 model (the native-attention matcher and the fp16 engine rewrite work
on that shape).

Streaming like :func:`blockpilot.export.fp16_graph.to_fp16_graph`: the structure is loaded without external data and
each weight is widened and written on its own into ``<graph>.onnx.data`` (:class:`~.external_data.DataWriter`), so the
peak is the structure plus one tensor. The output has the layout :func:`~.external_data.consolidate` writes: one
page-aligned data file when the source had external data or the float32 weights exceed the threshold, else inline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BlockpilotError

LOW_TYPES = (10, 16)  # TensorProto.FLOAT16, TensorProto.BFLOAT16
FLOAT = 1  # TensorProto.FLOAT
SYMBOLIC_SCALARS = (math.sqrt(2.0), 1.0 / math.sqrt(2.0), math.sqrt(2.0 / math.pi), 0.044715)


class Float32GraphError(BlockpilotError, ValueError):
    """A traced graph cannot be widened to float32 (control flow, an unreadable tensor); names the graph."""


def finish_traced_graph(path: str | Path, *, widen: bool, scalars: Iterable[float] = ()) -> None:
    """Check a graph ``torch.onnx.export`` just wrote and give it its bundle layout: a bf16/fp16 trace (``widen``)
    is widened to float32 by :func:`to_float32_graph` (which also writes ``<graph>.onnx.data`` where the weights go
    external); a float32 trace is consolidated as before (:func:`~.external_data.consolidate`)."""
    import onnx

    from .external_data import consolidate

    if not widen:
        onnx.checker.check_model(str(path))
        consolidate(path)  # weights over the threshold (or torch's per-tensor files) -> <graph>.onnx.data
        return
    to_float32_graph(path, exact_scalars=scalars)
    onnx.checker.check_model(str(path))


def traced_scalars(module: Any, example: tuple[Any, ...]) -> tuple[float, ...]:
    """The Python float scalars ``module``'s forward uses on ``example`` (from a ``torch.jit.trace``, which holds the
    parameters by reference, not a copy), plus the ones torch's ONNX symbolics add (GELU's ``sqrt(2)``, ``sqrt(2/pi)``
    and ``0.044715``): the candidates :func:`to_float32_graph` restores from their low-precision roundings."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
    found: set[float] = set()
    for n in traced.inlined_graph.nodes():
        if n.kind() != "prim::Constant" or not n.hasAttribute("value"):
            continue
        if n.kindOf("value") == "f":
            found.add(float(n.f("value")))
        elif n.kindOf("value") == "t":  # a scalar the tracer wrapped as a 0-d double tensor
            value = n.t("value")
            if value.is_floating_point() and value.numel() == 1:
                found.add(float(value.item()))
    return tuple(sorted(found | set(SYMBOLIC_SCALARS)))


def graph_float_types(path: str | Path) -> set[int]:
    """The ONNX data types of the float initializers of the graph at ``path`` (structure only, no weight read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {int(t.data_type) for t in model.graph.initializer if t.data_type in (FLOAT, *LOW_TYPES)}


def to_float32_graph(onnx_in: str | Path, onnx_out: str | Path | None = None, *,
                     threshold: int | None = None, exact_scalars: Iterable[float] = ()) -> dict[str, int]:
    """Rewrite the bfloat16/float16 graph ``onnx_in`` into a float32 graph at ``onnx_out`` (default: in place).

    Initializers, ``Constant`` / ``ConstantOfShape`` values, ``Cast`` targets and the element types of graph inputs,
    outputs and value_info go from bfloat16/float16 to float32. A ``Cast`` that becomes float32 -> float32 stays: the
    tracer writes ``.float()`` / ``.to(dtype)`` as a Cast even when the dtype does not change, so a float32 trace has
    the same Casts, and keeping them leaves the LM graph node for node the graph of the float32 path (ONNX Runtime
    and TensorRT drop them as no-ops).

    The tracer types a Python scalar met in bfloat16 arithmetic (``scores * head_dim ** -0.5``, the exporter's own
    ``sqrt(2)`` of GELU) as a bfloat16 Constant, i.e. rounded; eager torch computes with the scalar unrounded.
    ``exact_scalars`` are the scalars the traced code used (:func:`traced_scalars`): a one-element low-precision
    Constant equal to exactly one of them rounded to that precision gets the scalar's float32 value back, as the
    float32 trace has it. Returns counts of what changed. Raises :class:`Float32GraphError` for graphs with
    control-flow subgraphs."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from ..formats.onnx_external import external_files
    from .external_data import MIN_TENSOR_BYTES, DataWriter, external_threshold, graph_weight_bytes, save_structure

    src = Path(onnx_in)
    dst = Path(onnx_out) if onnx_out is not None else src
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise Float32GraphError(f"{src}: node {node.name or node.op_type!r} has a control-flow subgraph; "
                                    "to_float32_graph rewrites flat graphs only")
    old_files = external_files(src)
    limit = external_threshold() if threshold is None else threshold
    widened_bytes = sum(_tensor_bytes(t) * (2 if t.data_type in LOW_TYPES else 1) for t in graph.initializer)
    external = bool(old_files) or max(widened_bytes, graph_weight_bytes(model)) > limit
    if external and dst.parent.resolve() != src.parent.resolve():
        raise Float32GraphError(f"{src}: an external-data rewrite writes beside its source; got {dst}")
    writer = DataWriter(dst) if external else None
    counts = {"initializers": 0, "constants": 0, "casts_retargeted": 0, "io_retyped": 0,
              "scalars_restored": 0}
    try:
        for init in graph.initializer:
            low = init.data_type in LOW_TYPES
            if low or (writer is not None and _tensor_bytes(init) >= MIN_TENSOR_BYTES):
                array = np.asarray(_array(init, src.parent), order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
                if low:
                    array = array.astype(np.float32)
                    counts["initializers"] += 1
                if writer is not None and array.nbytes >= MIN_TENSOR_BYTES:
                    writer.put_array(init, array, TensorProto.FLOAT if low else None)
                else:
                    init.CopyFrom(numpy_helper.from_array(array, init.name))
                del array
    except BaseException:
        if writer is not None:
            writer.close(keep=False)
        raise
    restore = _restorable(exact_scalars)
    try:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and (attr.t.data_type in LOW_TYPES or _external(attr.t)):
                    # Constant values (a graph over 2 GB has its big ones in torch's per-tensor files too)
                    scalar = node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value"
                    counts["scalars_restored"] += _widen_constant(attr.t, src.parent, writer,
                                                                  restore if scalar else {})
                    counts["constants"] += 1
                elif node.op_type == "Cast" and attr.name == "to" and attr.i in LOW_TYPES:
                    attr.i = TensorProto.FLOAT  # kept, as float32 -> float32: the float32 trace has the same Casts
                    counts["casts_retargeted"] += 1
    except BaseException:
        if writer is not None:
            writer.close(keep=False)
        raise
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.tensor_type.elem_type in LOW_TYPES:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
            counts["io_retyped"] += 1
    if writer is None:
        save_structure(model, dst)
    else:
        writer.close(keep=True)
        save_structure(model, dst)
        for old in old_files:
            if old != writer.name:
                (src.parent / old).unlink(missing_ok=True)
    return counts


def _external(tensor: Any) -> bool:
    from .external_data import _is_external

    return bool(_is_external(tensor))


def _widen_constant(tensor: Any, base: Path, writer: Any, restore: dict[tuple[int, float], float]) -> int:
    """Widen one node-attribute tensor in place (into ``writer`` when it was external); 1 if a scalar was restored."""
    from onnx import TensorProto, numpy_helper

    low = tensor.data_type in LOW_TYPES
    value = np.asarray(_array(tensor, base), order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
    restored = 0
    if low:
        key = (int(tensor.data_type), float(value.astype(np.float32).ravel()[0])) if value.size == 1 else None
        value = value.astype(np.float32)
        if key is not None and key in restore:
            value = np.full(value.shape, restore[key], dtype=np.float32)
            restored = 1
    if _external(tensor):
        if writer is None:
            raise Float32GraphError(f"{base}: constant {tensor.name!r} is external but the rewrite writes no data file")
        writer.put_array(tensor, value, TensorProto.FLOAT if low else None)
    else:
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return restored


def _restorable(scalars: Iterable[float]) -> dict[tuple[int, float], float]:
    """``(low ONNX type, rounded value) -> float32 value`` for each scalar that rounding changes; a rounded value two
    different scalars share is left out (which one it was cannot be told)."""
    import ml_dtypes

    out: dict[tuple[int, float], float | None] = {}
    for s in set(float(x) for x in scalars):
        exact = float(np.float32(s))
        for onnx_type, low in ((16, ml_dtypes.bfloat16), (10, np.float16)):
            with np.errstate(over="ignore"):
                roundings = {float(np.array(s).astype(low)), float(np.float32(s).astype(low))}
            for rounded in roundings:
                if rounded == exact or not math.isfinite(rounded):
                    continue
                key = (onnx_type, rounded)
                out[key] = exact if out.get(key, exact) == exact else None  # None: ambiguous, left rounded
    return {k: v for k, v in out.items() if v is not None}


def _tensor_bytes(tensor: Any) -> int:
    from .external_data import _external_info, _is_external

    if _is_external(tensor):
        return int(_external_info(tensor).get("length") or 0)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = 1
    for d in tensor.dims:
        count *= d
    return count * (2 if tensor.data_type in LOW_TYPES else 4)


def _array(tensor: Any, base: Path) -> Any:
    from .external_data import tensor_array

    try:
        return tensor_array(tensor, base)
    except (OSError, ValueError) as exc:
        raise Float32GraphError(f"{base}: initializer {tensor.name!r} unreadable ({exc})") from exc
