"""``blockpilot export``: a checkpoint to a verified bundle (today: the ONNX graphs with decomposed
block-diffusion attention that the ONNX Runtime backend runs, plus the model's config, tokenizer and
answer schema; TensorRT engines and quantized graphs join the same bundle layout)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.bundle import BundleError, BundleWriter, load_bundle
from ..formats.onnx_io import EMBED_FILE, LM_FILE, SPEC_FILE, VISION_FILE

DEFAULT_MAX_PROMPT_TOKENS = 1024
VARIANT = "decomposed"
# Engine targets buildable from this tool chain. TensorRT-RTX builds ahead of time on a machine without
# a GPU for these compute capabilities; Orin / Thor / H100 engines need TensorRT proper (JetPack on the
# Jetson itself, TensorRT 10/11 on an x86 GPU box).
ENGINE_TARGETS = {"rtx-ada": "8.9", "rtx-blackwell": "12.0"}
ENGINE_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportSummary:
    bundle: Path
    files: dict[str, int]  # relative path -> bytes
    capacity: int
    seconds: dict[str, float]

    def table(self) -> str:
        rows = [f"bundle   {self.bundle}  (KV cache capacity {self.capacity} slots)"]
        rows += [f"  {rel:<40s} {size / 1e6:8.2f} MB" for rel, size in sorted(self.files.items())]
        rows.append("stages   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(rows)


def export_bundle(checkpoint: str | Path, out: str | Path, *, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                  with_weights: bool = False, overwrite: bool = False, targets: tuple[str, ...] = (),
                  engine_precision: str = "fp16", recipe: str | None = None, calib: int = 32,
                  attention: str = "decomposed") -> ExportSummary:
    """Export ``checkpoint`` (fp32) into the bundle directory ``out`` and verify it by loading it back.

    The KV cache capacity is the one a planner with the scaffold decoder sizes for ``max_prompt_tokens``.
    ``with_weights`` also copies the safetensors (for the torch backend on the car). ``targets`` (keys
    of :data:`ENGINE_TARGETS`) adds TensorRT engines of the graphs in ``engine_precision``. ``recipe``
    ("fp8") quantizes first with modelopt, calibrated on ``calib`` generated calibration samples, and
    exports standard FP8 Q/DQ graphs (their engines are strongly typed FP8; ``engine_precision`` is ignored).
    ``attention="native"`` builds the LM-step engines from the graph rewritten to ONNX ``Attention``
    (opset 23), TensorRT's attention layer; the bundle's ONNX graphs stay decomposed for ONNX Runtime.
    """
    if attention not in ("decomposed", "native"):
        raise BundleError(f"attention must be decomposed or native, got {attention!r}")
    if recipe not in (None, "fp8"):
        raise BundleError(f"export --recipe {recipe!r}: bundles carry fp32 or fp8 graphs today (NVFP4 graphs hold "
                          "modelopt's custom nodes, which neither ONNX Runtime nor TensorRT-RTX runs)")
    unknown = [t for t in targets if t not in ENGINE_TARGETS]
    if unknown or engine_precision not in ENGINE_PRECISIONS:
        raise BundleError(f"engine targets {unknown} / precision {engine_precision!r}: this tool chain builds "
                          f"{sorted(ENGINE_TARGETS)} in {ENGINE_PRECISIONS}; Orin, Thor and H100 engines need "
                          "TensorRT proper (build on the Jetson or a GPU workstation)")
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.planner import Planner
    from .onnx_graphs import export_onnx

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    planner = Planner.from_checkpoint(Path(checkpoint), decoder=DecoderSettings(name="scaffold"),
                                      max_prompt_tokens=max_prompt_tokens)
    capacity = planner.backend.capacity
    seconds["load"] = time.perf_counter() - t0
    quant_report: dict[str, Any] | None = None
    if recipe is not None:
        t0 = time.perf_counter()
        quant_report = _quantize(planner, recipe, calib, targets)
        seconds["quantize"] = time.perf_counter() - t0
    precision = recipe or "fp32"
    with tempfile.TemporaryDirectory(prefix="blockpilot-export-") as tmp:
        t0 = time.perf_counter()
        if recipe is None:
            spec = export_onnx(planner.backend.model, tmp, capacity)  # type: ignore[attr-defined]
        else:
            from .quant_onnx import export_quantized_onnx

            spec = export_quantized_onnx(planner.backend.model, tmp, capacity)["spec"]  # type: ignore[attr-defined]
        seconds["onnx"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with BundleWriter(out, overwrite=overwrite) as writer:
            writer.add_model(checkpoint, weights=with_weights)
            writer.precision_map = quant_report["precision"] if quant_report else {}
            if quant_report:
                writer.recipe = quant_report["recipe"]
            io: dict[str, Any] = {"spec": spec}
            if (Path(tmp) / VISION_FILE).is_file():
                writer.add_graph(Path(tmp) / VISION_FILE, role="vision", variant=VARIANT, precision=precision, io=io)
            writer.add_graph(Path(tmp) / LM_FILE, role="lm_step", variant=VARIANT, precision=precision, io=io,
                             extra_files=[Path(tmp) / EMBED_FILE, Path(tmp) / SPEC_FILE])
            if targets:
                t1 = time.perf_counter()
                _add_engines(writer, Path(tmp), spec, targets, "fp8" if recipe else engine_precision, attention)
                seconds["engines"] = time.perf_counter() - t1
        seconds["bundle"] = time.perf_counter() - t0
    bundle = load_bundle(out)  # hashes checked once more, as the car will
    files = {rel: int(info["bytes"]) for rel, info in bundle.files.items()}
    return ExportSummary(bundle.path, files, capacity, seconds)


def _quantize(planner: Any, recipe: str, calib: int, targets: tuple[str, ...]) -> dict[str, Any]:
    """Quantize the planner's model in place with ``recipe``; the recipe is checked against every target."""
    from ..calibration import synthetic_calibration_source
    from ..quant.pipeline import quantize_planner
    from ..quant.recipes import resolve_recipe
    from ..quant.targets import check_recipe

    resolved = resolve_recipe(recipe)
    for target in targets:
        check_recipe(resolved, "rtx-ada" if target == "rtx-ada" else "cpu")
    report, _, _, _ = quantize_planner(planner, resolved, synthetic_calibration_source(4), calib)
    return {"precision": report.precision, "recipe": resolved.to_dict()}


def _add_engines(writer: BundleWriter, tmp: Path, spec: dict[str, Any], targets: tuple[str, ...],
                 precision: str, attention: str = "decomposed") -> None:
    from .fp16_graph import to_fp16_graph
    from .native_attention import build_native_engine, to_native_attention
    from .trt_build import build_engine, load_tensorrt, profiles_from_spec

    trt = load_tensorrt()
    for role, graph in (("vision", tmp / VISION_FILE), ("lm_step", tmp / LM_FILE)):
        if not graph.is_file():
            continue
        source = graph
        native = attention == "native" and role == "lm_step"
        if native:  # rewrite the attention first: the pattern is matched on the exported float32 graph
            source = tmp / f"{graph.stem}.native.onnx"
            to_native_attention(graph, source)
        if precision == "fp16":  # fp32 and fp8 (Q/DQ) graphs build as they are
            half = tmp / f"{source.stem}.fp16.onnx"
            to_fp16_graph(source, half)
            source = half
        variant = "native" if native else VARIANT
        for target in targets:
            cc = ENGINE_TARGETS[target]
            engine = tmp / target / f"{role}.{precision}.{variant}.engine"
            engine.parent.mkdir(exist_ok=True)
            profiles = profiles_from_spec(spec, role)
            inspector = None
            if native:  # fused attention kernels exist for fp16; fp32 / fp8-linear graphs may decompose it
                built = build_native_engine(source, engine, profiles=profiles, compute_capability=cc,
                                            decomposable=precision != "fp16")
                report: dict[str, Any] = {"seconds": built.seconds, "engine_bytes": built.engine_bytes,
                                          "attention_layers": built.attention_layers,
                                          "decomposable": built.decomposable, "compute_capability": cc}
            else:
                result = build_engine(source, engine, profiles=profiles, compute_capability=cc, trt=trt)
                report = result.to_dict()
                inspector = result.inspector if result.inspector is not None and result.inspector.is_file() else None
            writer.add_engine(engine, target=target, sm=cc, role=role, variant=variant, precision=precision,
                              io={"build": report}, inspector=inspector)


def graphs_dir(bundle_path: str | Path) -> Path:
    return Path(bundle_path) / "graphs" / VARIANT
