"""The LM step's KV-cache I/O retyped to float16 at the graph boundary only, for engines whose graph is not
rewritten to compute in fp16 (the FP8 Q/DQ graphs: float32 activations around FP8 matmuls).

TensorRT networks here are strongly typed, so the engine's cache tensors have the graph's I/O types. An fp16
engine gets fp16 cache I/O from :func:`blockpilot.export.fp16_graph.to_fp16_graph` (``fp16_io``); an FP8 graph
keeps computing as it was quantized, and :func:`fp16_cache_io` only changes what crosses the boundary: each
cache input becomes float16 followed by a ``Cast`` to float32, each cache output is a ``Cast`` to float16 of what
the graph computed. The runtime then keeps half the cache bytes; the attention reads K/V rounded to fp16 (a
relative error of at most 2^-11, well inside what FP8 activations already lose).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def fp16_cache_io(onnx_in: str | Path, onnx_out: str | Path, names: Iterable[str] | None = None) -> dict[str, int]:
    """Write ``onnx_out``: ``onnx_in`` with the float32 graph inputs / outputs ``names`` (default: the LM step's
    cache I/O, :data:`blockpilot.export.fp16_graph.KV_CACHE_IO`) typed float16 and a ``Cast`` at each one's
    boundary; nothing else changes. Weights stay where they are (external data is shared, never loaded), so
    graphs over 2 GB rewrite too. Returns ``{"inputs": n, "outputs": n}``. Raises ``ValueError`` naming a name
    that is not a float32 input or output of the graph."""
    import onnx
    from onnx import TensorProto, helper

    from .external_data import save_structure, share_external_data
    from .fp16_graph import KV_CACHE_IO
    from .trt_build import all_nodes

    wanted = tuple(KV_CACHE_IO if names is None else names)
    model = onnx.load(str(onnx_in), load_external_data=False)
    graph = model.graph
    if any(n.op_type in ("If", "Loop", "Scan") for n in all_nodes(graph)):
        raise ValueError(f"{onnx_in}: graphs with control-flow subgraphs are not supported by fp16_cache_io")
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    io: dict[str, Any] = {vi.name: vi for vi in [*graph.input, *graph.output]
                          if vi.type.tensor_type.elem_type == f32}
    stray = [n for n in wanted if n not in io]
    if stray:
        raise ValueError(f"{onnx_in}: {stray} are not float32 inputs or outputs of the graph "
                         f"(its float32 I/O: {sorted(io)})")
    inputs = {vi.name for vi in graph.input}
    first: list[Any] = []
    last: list[Any] = []
    renamed: dict[str, str] = {}
    for name in wanted:
        io[name].type.tensor_type.elem_type = f16
        inner = f"{name}__fp32"
        renamed[name] = inner
        if name in inputs:  # the graph reads name__fp32, a Cast of the fp16 input
            first.append(helper.make_node("Cast", [name], [inner], to=f32, name=f"{name}_from_fp16"))
        else:  # the graph writes name__fp32, a Cast makes the fp16 output
            last.append(helper.make_node("Cast", [inner], [name], to=f16, name=f"{name}_to_fp16"))
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    nodes = [*first, *graph.node, *last]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # their shapes are inferred again
    Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
    share_external_data(onnx_in, onnx_out)
    save_structure(model, onnx_out)
    onnx.checker.check_model(str(onnx_out))
    return {"inputs": len(first), "outputs": len(last)}
