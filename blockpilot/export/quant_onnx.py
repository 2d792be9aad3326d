"""Quantized ONNX graphs through Model Optimizer's ONNX path, rewritten to standard FP8 Q/DQ.

Model Optimizer 0.47 exports a fake-quantized model through the TorchScript ONNX exporter: each enabled
quantizer's symbolic emits nodes of its own, in the custom ``trt`` domain:

* FP8 (E4M3, per-tensor): ``trt::TRT_FP8QuantizeLinear(x, scale)`` -> ``trt::TRT_FP8DequantizeLinear(q, scale)``
  with a scalar ``Constant`` scale ``amax / 448``; the quantized tensor is typed ``uint8``.
* NVFP4 weights ("static"): ``trt::TRT_FP4QDQ(w, block_size=16)``, a placeholder that modelopt's ONNX
  post-processing (``modelopt.onnx``) later expands into two DequantizeLinear nodes.
* NVFP4 activations ("dynamic", set by ``configure_linear_module_onnx_quantizers``):
  ``trt::TRT_FP4DynamicQuantize`` (two outputs: E2M1 values and E4M3 block scales), a standard
  ``DequantizeLinear`` of the scales and a blocked ``DequantizeLinear(axis=-1, block_size=16)``.

:func:`export_quantized_onnx` runs :func:`~blockpilot.export.onnx_graphs.export_onnx` (opset 19, the first
with float8 Q/DQ; no ``export_torch_mode`` — that switch turns the ONNX symbolics *off*) and
:func:`rewrite_fp8_qdq` turns the FP8 pair into standard ``QuantizeLinear`` / ``DequantizeLinear`` with a
``float8e4m3fn`` zero point, which TensorRT(-RTX) builds strongly typed and ONNX Runtime runs on CPU.
The NVFP4 nodes stay custom: those graphs are only checked structurally here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..formats.onnx_spec import LM_FILE, VISION_FILE, vision_graphs
from ..vla.image_policy import ImagePolicy
from ..vla.model import VLAModel
from .external_data import save_structure
from .onnx_graphs import DEFAULT_IMAGE_HW, export_onnx

QDQ_OPSET = 19  # float8 QuantizeLinear / DequantizeLinear
BLOCK_QDQ_OPSET = 21  # DequantizeLinear(block_size=...), which NVFP4 activations export to
TRT_DOMAIN = "trt"
TRT_FP8_Q, TRT_FP8_DQ = "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"
TRT_FP4_QDQ, TRT_FP4_DYNAMIC = "TRT_FP4QDQ", "TRT_FP4DynamicQuantize"
FP8_ZERO_POINT = "fp8e4m3fn_zero_point"
DQ_OPS = frozenset({"DequantizeLinear", TRT_FP8_DQ, TRT_FP4_QDQ})
Q_OPS = frozenset({"QuantizeLinear", TRT_FP8_Q, TRT_FP4_DYNAMIC})
# Ops a weight or activation passes through between its DequantizeLinear and the MatMul that reads it.
PASSTHROUGH = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
UNQUANTIZED_NAMES = ("lm_head", "embed")  # the logits projection and the embeddings keep full precision


def _onnx() -> Any:
    import onnx

    return onnx


def _elem_name(elem: int) -> str:
    return str(_onnx().TensorProto.DataType.Name(elem)).lower()


def rewrite_fp8_qdq(model: Any, check: bool = True) -> dict[str, int]:
    """Rewrite modelopt's ``trt::TRT_FP8QuantizeLinear`` / ``trt::TRT_FP8DequantizeLinear`` in ``model`` (an
    ``onnx.ModelProto``, in place) into standard ``QuantizeLinear`` / ``DequantizeLinear`` sharing one scalar
    float8e4m3fn zero point. Needs default-domain opset >= 19; drops the ``trt`` opset import when no ``trt``
    node is left. Returns counts of what changed."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    fp8_nodes = [n for n in graph.node if n.domain == TRT_DOMAIN and n.op_type in (TRT_FP8_Q, TRT_FP8_DQ)]
    counts = {"quantize": 0, "dequantize": 0, "value_info_retyped": 0}
    if not fp8_nodes:
        return counts
    if opset < QDQ_OPSET:
        raise ValueError(f"float8 QuantizeLinear/DequantizeLinear need opset >= {QDQ_OPSET}, the graph has {opset}")
    q_outputs: set[str] = set()
    for node in fp8_nodes:
        if len(node.input) != 2 or len(node.output) != 1:
            raise ValueError(f"{node.name}: expected (x, scale) -> y, got {len(node.input)} inputs")
        is_q = node.op_type == TRT_FP8_Q
        node.op_type = "QuantizeLinear" if is_q else "DequantizeLinear"
        node.domain = ""
        node.input.append(FP8_ZERO_POINT)
        counts["quantize" if is_q else "dequantize"] += 1
        if is_q:
            q_outputs.add(node.output[0])
    if FP8_ZERO_POINT not in {i.name for i in graph.initializer}:
        zero = helper.make_tensor(FP8_ZERO_POINT, TensorProto.FLOAT8E4M3FN, [], vals=b"\x00", raw=True)
        graph.initializer.append(zero)
    for vi in [*graph.value_info, *graph.output]:
        if vi.name in q_outputs and vi.type.tensor_type.elem_type != TensorProto.FLOAT8E4M3FN:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN  # modelopt typed the FP8 tensor as uint8
            counts["value_info_retyped"] += 1
    if not any(n.domain == TRT_DOMAIN for n in graph.node):
        keep = [o for o in model.opset_import if o.domain != TRT_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    if check:  # callers holding only the structure of a graph with external data check the saved file instead
        onnx.checker.check_model(model)
    return counts


def _types(model: Any) -> dict[str, int]:
    onnx = _onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom nodes can stop inference; the exporter's own annotations remain
        inferred = model
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _qdq_elem(node: Any, types: dict[str, int], producer: dict[str, Any] | None = None) -> str:
    """The low-precision element type a Q/DQ node works on (``float4e2m1`` for the FP4 custom nodes)."""
    if node.op_type in (TRT_FP4_QDQ, TRT_FP4_DYNAMIC):
        return "float4e2m1"
    if node.op_type in (TRT_FP8_Q, TRT_FP8_DQ):
        return "float8e4m3fn"
    src = (producer or {}).get(node.input[0])
    if node.op_type == "DequantizeLinear" and src is not None and src.op_type == TRT_FP4_DYNAMIC:
        return "float4e2m1" if src.output[0] == node.input[0] else "float8e4m3fn"  # values, block scales
    if len(node.input) > 2 and node.input[2]:
        return _elem_name(types.get(node.input[2], 0))
    probe = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
    return _elem_name(types.get(probe, 2)) if probe in types else "uint8"  # ONNX's default without a zero point


class _Graph:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.initializers = {i.name for i in model.graph.initializer}
        self.types = _types(model)

    def source(self, name: str) -> tuple[Any | None, str]:
        """The first node behind ``name`` that is not a pass-through op, and the name it produced."""
        node = self.producer.get(name)
        while node is not None and node.op_type in PASSTHROUGH:
            name = node.input[0]
            node = self.producer.get(name)
        return node, name

    def weight_name(self, name: str) -> str | None:
        """The initializer a MatMul input reads, through pass-through ops and any Q/DQ chain."""
        for _ in range(8):
            node, name = self.source(name)
            if node is None:
                return name if name in self.initializers else None
            if node.op_type not in DQ_OPS | Q_OPS:
                return None
            name = node.input[0]
        return None

    def matmuls(self) -> Iterator[dict[str, Any]]:
        for node in self.nodes:
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            row: dict[str, Any] = {"name": node.name, "weight": None, "weight_dq": None, "input_dq": None,
                                   "weight_chain": [], "input_chain": []}
            for name in node.input[:2]:
                weight = self.weight_name(name)
                side = "weight" if weight is not None and row["weight"] is None else "input"
                if side == "weight":
                    row["weight"] = weight
                src, _ = self.source(name)
                if src is not None and src.op_type in DQ_OPS:
                    row[f"{side}_dq"] = _qdq_elem(src, self.types, self.producer)
                    row[f"{side}_chain"] = self.chain(src)
            yield row

    def chain(self, dq: Any) -> list[str]:
        """Op types from a dequantize node back to its data source (``DequantizeLinear``, ``QuantizeLinear`` ...)."""
        out, node = [], dq
        for _ in range(4):
            if node is None or node.op_type not in DQ_OPS | Q_OPS:
                break
            out.append(f"{node.domain + '::' if node.domain else ''}{node.op_type}")
            node, _ = self.source(node.input[0])
        return out


def summarize_quant_graph(model_or_path: Any) -> dict[str, Any]:
    """Structural summary: Q/DQ counts by op and element type, custom nodes, the MatMuls fed by a DQ (and
    through which weight), the opset and whether ``onnx.checker`` passes."""
    onnx = _onnx()
    is_path = isinstance(model_or_path, (str, Path))
    model = onnx.load(str(model_or_path), load_external_data=False) if is_path else model_or_path
    g = _Graph(model)
    qdq = Counter(f"{n.op_type}:{_qdq_elem(n, g.types, g.producer)}" for n in g.nodes if n.op_type in DQ_OPS | Q_OPS)
    custom = Counter(f"{n.domain}::{n.op_type}" for n in g.nodes if n.domain not in ("", "ai.onnx"))
    rows = list(g.matmuls())
    try:
        onnx.checker.check_model(str(model_or_path) if is_path else model)
        checker = "ok"
    except onnx.checker.ValidationError as exc:
        checker = str(exc).splitlines()[0]
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
        "qdq": dict(sorted(qdq.items())),
        "custom_nodes": dict(sorted(custom.items())),
        "matmuls": len(rows),
        "matmuls_fed_by_dq": [r for r in rows if r["weight_dq"] or r["input_dq"]],
        "weight_matmuls_without_dq": [r["weight"] or r["name"] for r in rows
                                      if (r["weight"] or "lm_head" in r["name"]) and not r["weight_dq"]],
        "checker": checker,
    }


def _is_protected(row: dict[str, Any]) -> bool:
    return any(s in (row["weight"] or "") or s in row["name"] for s in UNQUANTIZED_NAMES)


def _common_checks(summary: dict[str, Any], rows: list[dict[str, Any]], problems: list[str]) -> None:
    if summary["checker"] != "ok":
        problems.append(f"onnx.checker: {summary['checker']}")
    for row in rows:
        if _is_protected(row) and (row["weight_dq"] or row["input_dq"]):
            problems.append(f"{row['name']}: lm_head / embeddings must stay unquantized")


def check_fp8_structure(onnx_path: str | Path) -> dict[str, Any]:
    """Check a rewritten FP8 graph: standard ops only, opset >= 19, every quantized Linear reads its weight
    and its input through QuantizeLinear -> DequantizeLinear in float8e4m3fn, every Q/DQ is float8e4m3fn,
    and the lm_head / embedding MatMuls have no Q/DQ. Returns the summary with ``ok`` and ``problems``."""
    summary = summarize_quant_graph(onnx_path)
    rows = summary["matmuls_fed_by_dq"]
    problems: list[str] = []
    _common_checks(summary, rows, problems)
    if summary["custom_nodes"]:
        problems.append(f"custom-domain nodes left: {summary['custom_nodes']}")
    if summary["opset"] < QDQ_OPSET:
        problems.append(f"opset {summary['opset']} < {QDQ_OPSET}")
    odd = {k: v for k, v in summary["qdq"].items() if not k.endswith(":float8e4m3fn")}
    if odd:
        problems.append(f"Q/DQ nodes that are not float8e4m3fn: {odd}")
    pair = ["DequantizeLinear", "QuantizeLinear"]
    for row in rows:
        if not _is_protected(row) and row["weight"] is None:
            problems.append(f"{row['name']}: fed by DQ but reads no weight initializer")
        for side in ("weight", "input"):
            if row[f"{side}_dq"] != "float8e4m3fn" or row[f"{side}_chain"][:2] != pair:
                problems.append(f"{row['name']}: {side} is not QuantizeLinear -> DequantizeLinear float8e4m3fn "
                                f"({row[f'{side}_chain']}, {row[f'{side}_dq']})")
    summary["quantized_weights"] = sorted(r["weight"] for r in rows if r["weight"])
    summary["ok"] = not problems
    summary["problems"] = problems
    return summary


def check_nvfp4_structure(onnx_path: str | Path) -> dict[str, Any]:
    """Check what modelopt emits for NVFP4 (structure only, no build): each quantized Linear's weight goes
    through ``trt::TRT_FP4QDQ`` and its input through ``trt::TRT_FP4DynamicQuantize`` then a blocked
    ``DequantizeLinear`` (block_size 16); lm_head / embeddings stay unquantized. FP8 parts (a vision tower kept
    in FP8) may sit beside them. Returns the summary with counts, ``ok`` and ``problems``."""
    summary = summarize_quant_graph(onnx_path)
    model = _onnx().load(str(onnx_path))
    rows = summary["matmuls_fed_by_dq"]
    problems: list[str] = []
    _common_checks(summary, rows, problems)
    fp4_rows = [r for r in rows if r["weight_dq"] == "float4e2m1"]
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    custom = summary["custom_nodes"]
    unknown = {k: v for k, v in custom.items()
               if k not in {f"{TRT_DOMAIN}::{op}" for op in (TRT_FP4_QDQ, TRT_FP4_DYNAMIC, TRT_FP8_Q, TRT_FP8_DQ)}}
    if unknown:
        problems.append(f"unexpected custom nodes: {unknown}")
    if not fp4_rows:
        problems.append("no MatMul reads an NVFP4 weight")
    for row in fp4_rows:
        if row["weight_chain"] != [f"{TRT_DOMAIN}::{TRT_FP4_QDQ}"]:
            problems.append(f"{row['name']}: weight chain {row['weight_chain']}")
        if row["input_chain"][-1:] != [f"{TRT_DOMAIN}::{TRT_FP4_DYNAMIC}"]:
            problems.append(f"{row['name']}: input chain {row['input_chain']} does not start at "
                            f"{TRT_FP4_DYNAMIC}")
    summary.update({
        "fp4_weight_qdq": custom.get(f"{TRT_DOMAIN}::{TRT_FP4_QDQ}", 0),
        "fp4_dynamic_quantize": custom.get(f"{TRT_DOMAIN}::{TRT_FP4_DYNAMIC}", 0),
        "block_dequantize": len(blocked),
        "block_sizes": sorted({a.i for n in blocked for a in n.attribute if a.name == "block_size"}),
        "fp4_weights": sorted(r["weight"] for r in fp4_rows if r["weight"]),
        "ok": not problems,
        "problems": problems,
    })
    return summary


def _has_block_quantizers(model: nn.Module) -> bool:
    return any(getattr(m, "block_sizes", None) and getattr(m, "is_enabled", False)
               for name, m in model.named_modules() if name.endswith("_quantizer"))


def export_quantized_onnx(model: VLAModel | nn.Module, out_dir: str | Path, capacity: int, *,
                          image_hw: tuple[int, int] = DEFAULT_IMAGE_HW, opset: int | None = None,
                          standard_fp8: bool = True, image_sizes: Sequence[tuple[int, int]] | None = None,
                          policy: ImagePolicy | None = None) -> dict[str, Any]:
    """Export a modelopt-quantized :class:`VLAModel` with :func:`export_onnx` (block-quantized activations
    set to modelopt's dynamic export; ``opset`` defaults to 21 with block quantizers, else 19), rewrite FP8
    Q/DQ to the standard ops (``standard_fp8``) and return ``{"spec": ..., "graphs": {role: summary}}``
    (each summary also holds the rewrite counts)."""
    from modelopt.torch.quantization.export_onnx import configure_linear_module_onnx_quantizers

    onnx = _onnx()
    if opset is None:
        opset = BLOCK_QDQ_OPSET if _has_block_quantizers(model) else QDQ_OPSET
    if opset < QDQ_OPSET:
        raise ValueError(f"quantized graphs need opset >= {QDQ_OPSET}, got {opset}")
    out = Path(out_dir)
    with configure_linear_module_onnx_quantizers(model):
        spec = export_onnx(model, out, capacity, image_hw=image_hw, opset=opset,  # type: ignore[arg-type]
                           image_sizes=image_sizes, policy=policy)
    graphs: dict[str, Any] = {}
    vision_files = [g["file"] for g in vision_graphs(spec["vision"])] if spec.get("vision") else [VISION_FILE]
    # One vision graph per exported camera size: the first keeps the role's key, the others add their file.
    for role, file in (("lm_step", LM_FILE), *(("vision" if f == VISION_FILE else f"vision {f}", f)
                                               for f in vision_files)):
        path = out / file
        if not path.is_file():
            continue
        rewrite: dict[str, int] = {}
        if standard_fp8:
            proto = onnx.load(str(path), load_external_data=False)  # structure only: weights stay external
            rewrite = rewrite_fp8_qdq(proto, check=False)
            if rewrite["quantize"] or rewrite["dequantize"]:
                save_structure(proto, path)
                onnx.checker.check_model(str(path))
        graphs[role] = {"file": str(path), "rewrite": rewrite, **summarize_quant_graph(path)}
    return {"spec": spec, "graphs": graphs}


def ort_agreement(model: VLAModel, onnx_dir: str | Path, batch: dict[str, Any]) -> dict[str, Any]:
    """Run the exported graphs in ONNX Runtime (CPU) on one :func:`~blockpilot.calibration.loop.observation_batches`
    batch, one causal window over the whole sequence, and compare with the fake-quantized torch model: top-1
    agreement of the LM step, and the largest vision-feature difference when the image grids match the graph's."""
    import json

    import numpy as np
    import onnxruntime as ort
    import torch

    from ..formats.onnx_spec import SPEC_FILE
    from .onnx_graphs import LMStep

    out = Path(onnx_dir)
    spec = json.loads((out / SPEC_FILE).read_text())
    ids: torch.Tensor = batch["input_ids"]
    t, capacity = int(ids.shape[1]), int(spec["capacity"])
    if t > capacity:
        raise ValueError(f"the batch holds {t} tokens, more than the exported capacity {capacity}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    result: dict[str, Any] = {"tokens": t}
    model = model.eval()
    with torch.no_grad():
        grid = batch.get("grid_thw")
        feats_torch = feats_ort = None
        if grid is not None:
            feats_torch = model.encode_images(batch["pixel_values"].float(), grid)
            feats_ort = feats_torch
            vision = spec.get("vision")
            if vision is not None and all(list(map(int, g)) == vision["grid_thw"] for g in grid.tolist()):
                sess = ort.InferenceSession(str(out / VISION_FILE), opts, providers=["CPUExecutionProvider"])
                per = int(batch["pixel_values"].shape[0]) // int(grid.shape[0])
                chunks = batch["pixel_values"].float().numpy().reshape(int(grid.shape[0]), per, -1)
                feats_ort = torch.from_numpy(np.concatenate([sess.run(None, {"patches": c})[0] for c in chunks]))
                result["vision_max_abs_diff"] = float((feats_ort - feats_torch).abs().max())
                result["vision_ref_max_abs"] = float(feats_torch.abs().max())
        pos = model.rope_index(ids, grid)[0] if model.config.lm.mrope_section is not None \
            else torch.arange(t).view(1, 1, t).expand(3, 1, t)
        cfg = model.config.lm
        cache = torch.zeros(cfg.num_layers, 1, cfg.num_kv_heads, capacity, cfg.head_dim)
        scalars = [torch.tensor(v, dtype=torch.int64) for v in (0, t, 0)]
        step = LMStep(model.lm, model.config.tokens.mask, model.config.diffusion.block_size).eval()
        top_torch = step(model.embed(ids, feats_torch), pos, *scalars, cache, cache)[0]
        feed = {"inputs_embeds": model.embed(ids, feats_ort).float().numpy(), "position_ids": pos.numpy(),
                "start": scalars[0].numpy(), "key_end": scalars[1].numpy(), "mode": scalars[2].numpy(),
                "past_k": cache.numpy(), "past_v": cache.numpy()}
    sess = ort.InferenceSession(str(out / LM_FILE), opts, providers=["CPUExecutionProvider"])
    top_ort = sess.run(["top1"], feed)[0]
    same = top_ort[0] == top_torch[0].numpy()
    result.update({"top1_agree": int(same.sum()), "top1_agreement": float(same.mean())})
    answer = int(batch.get("prompt_length", 0))
    if 0 < answer < t:
        result["answer_top1_agreement"] = float(same[answer - 1: t - 1].mean())
    return result
