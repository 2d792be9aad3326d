"""``blockpilot export``: a checkpoint to a verified bundle (today: the ONNX graphs with decomposed
block-diffusion attention that the ONNX Runtime backend runs, plus the model's config, tokenizer and
answer schema; TensorRT engines and quantized graphs join the same bundle layout)."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats.bundle import BundleError, BundleWriter, load_bundle
from ..formats.onnx_spec import EMBED_FILE, LM_FILE, SPEC_FILE, vision_graphs
from .progress import StageProgress
from .targets import (
    ATTENTION_ROUTES,
    EngineTarget,
    EngineTargetError,
    attention_route,
    check_buildable_here,
    current_compute_capability,
    resolve_engine_target,
)

DEFAULT_MAX_PROMPT_TOKENS = 1024  # the floor of the derived budget (blockpilot.vla.image_policy.MIN_PROMPT_TOKENS)
DEFAULT_IMAGE_HW = (112, 112)  # the reference camera; export --image-size picks others
VARIANT = "decomposed"
ENGINE_PRECISIONS = ("fp32", "fp16")
EXPORT_DTYPES = ("auto", "float32")  # auto: the checkpoint's stored dtype


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote, read back from the verified bundle, for the closing table."""

    bundle: Path
    files: dict[str, int]  # relative path -> bytes
    capacity: int
    seconds: dict[str, float]
    artifacts: tuple[dict[str, Any], ...] = ()  # kind, path, role, variant, precision, target, bytes, build_s
    precision_counts: dict[str, int] = field(default_factory=dict)  # quantized format -> modules
    recipe: str = "fp32"

    def table(self) -> str:
        total = sum(self.files.values())
        rows = [f"bundle     {self.bundle}  ({len(self.files)} files, {total / 1e6:.2f} MB, KV cache "
                f"{self.capacity} slots, {self.recipe})"]
        width = max([len(a["path"]) for a in self.artifacts] + [8])
        head = (f"  {'artifact':<{width}} {'role':<8} {'variant':<10} {'precision':<9} {'target':<13} "
                f"{'size':>9} {'build':>7}")
        rows += [head, "  " + "-" * (len(head) - 2)]
        for a in self.artifacts:
            build = f"{a['build_s']:.1f} s" if a.get("build_s") is not None else "-"
            rows.append(f"  {a['path']:<{width}} {a['role']:<8} {a['variant']:<10} {a['precision']:<9} "
                        f"{a.get('target') or '-':<13} {a['bytes'] / 1e6:>6.2f} MB {build:>7}")
        if self.precision_counts:
            rows.append("precision  " + ", ".join(f"{fmt} {n}" for fmt, n in sorted(self.precision_counts.items()))
                        + " modules (modelopt)")
        rows.append("stages     " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(rows)


@dataclass(frozen=True)
class _EnginePlan:
    target: EngineTarget
    precision: str
    route: str  # LM-step attention: decomposed | native | plugin


def export_bundle(checkpoint: str | Path, out: str | Path, *, max_prompt_tokens: int | None = None,
                  with_weights: bool = False, overwrite: bool = False, targets: tuple[str, ...] = (),
                  engine_precision: str = "fp16", recipe: str | None = None, calib: int = 32,
                  attention: str = "auto", progress: StageProgress | None = None,
                  timing_cache: Path | None = None, schema: str | None = None, sign: Any = None,
                  image_sizes: Sequence[tuple[int, int]] = (), cameras: int = 1, dtype: str = "auto") -> ExportSummary:
    """Export ``checkpoint`` into the bundle directory ``out`` and verify it by loading it back.

    ``dtype="auto"`` loads and traces the model in the dtype its safetensors store (bf16 / fp16 checkpoints: never a
    float32 copy of the model; :func:`export_dtype`) and widens the traced graphs to float32 exactly, so the bundle's
    float32 graphs hold exactly the checkpoint's weights; ``"float32"`` loads in float32 first (the path of float32
    checkpoints, and of every export before). ``--recipe fp8`` and the plugin attention route load float32 either way
    (calibration runs the model in float32; the plugin graph is traced in float32).

    ``image_sizes`` (camera ``(height, width)``, default the 112x112 reference camera) are resized by the
    checkpoint's image policy, one vision graph per resized size (:mod:`blockpilot.export.vision_graphs`).
    The KV cache capacity is the one a planner with the scaffold decoder sizes for ``max_prompt_tokens``,
    by default the prompt budget of ``cameras`` frames of the largest exported size
    (:func:`export_prompt_budget`).
    ``with_weights`` also copies the safetensors (for the torch backend on the car). ``targets`` (names of
    :data:`blockpilot.export.targets.ENGINE_TARGETS`) adds TensorRT engines of the graphs in
    ``engine_precision``; each target's quantization gate checks ``recipe`` and its TensorRT must be the one
    here (TensorRT-RTX builds ``rtx`` targets ahead of time; ``orin``/``thor``/``h100`` build on the device).
    ``recipe`` ("fp8") quantizes first with modelopt, calibrated on ``calib`` generated calibration samples, and
    exports standard FP8 Q/DQ graphs (their engines are strongly typed FP8; ``engine_precision`` is ignored).
    ``attention`` picks the LM-step engines' attention route (``auto``: the target's, see
    :func:`blockpilot.export.targets.attention_route`); the bundle's ONNX graphs stay decomposed for ONNX Runtime,
    and a plugin route also ships the plugin graph. Stages draw on ``progress`` (default: none).
    ``timing_cache`` is a TensorRT timing cache file read and updated by every build (TensorRT proper; a no-op
    in TensorRT-RTX, which caches at run time), so rebuilding on a Jetson skips tactic timing.
    ``schema`` is the shared ``--schema`` option (:func:`blockpilot.vla.schema_io.resolve_schema`); the bundle
    records the resolved schema in its manifest and ``model/blockpilot.json``. The output path, config,
    tokenizer and schema are checked before any weight is read or graph exported. ``checkpoint`` may also be what
    ``blockpilot quantize`` wrote (:func:`~blockpilot.export.checkpoint_check.export_source`): exported as fp8 from
    its saved quantizers, not quantized again.
    """
    from .checkpoint_check import export_source

    source = export_source(checkpoint, recipe)
    checkpoint, recipe = source.checkpoint, source.recipe
    if recipe not in (None, "fp8"):
        raise BundleError(f"export --recipe {recipe!r}: bundles carry fp32 or fp8 graphs today (NVFP4 graphs hold "
                          "modelopt's custom nodes, which neither ONNX Runtime nor TensorRT-RTX runs)")
    if engine_precision not in ENGINE_PRECISIONS:
        raise BundleError(f"engine precision {engine_precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)} "
                          "(fp8 engines come from --recipe fp8)")
    plans = _plan_engines(targets, "fp8" if recipe else engine_precision, recipe, attention)
    sizes = tuple(image_sizes) or (DEFAULT_IMAGE_HW,)
    if max_prompt_tokens is None:
        max_prompt_tokens = export_prompt_budget(checkpoint, sizes, cameras)
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.planner import Planner
    from .checkpoint_check import check_bundle_target, checked_schema, write_schema_file
    from .onnx_graphs import export_onnx

    check_bundle_target(Path(out), overwrite)
    driving = checked_schema(Path(checkpoint), schema, calibrate=recipe if source.quantized is None else None)
    from ..vla.memory_budget import check_fits

    load_dtype = export_dtype(checkpoint, dtype, float32_only=recipe is not None or any(p.route == "plugin"
                                                                                        for p in plans))

    check_fits(checkpoint, ("export", *(("engines",) if plans else ()), *(("quantize",) if recipe else ())),
               load_dtype, what="blockpilot export")  # before any weight is read: refuse, not be killed

    progress = progress or StageProgress(enabled=False)
    progress.stages = 3 + int(recipe is not None) + int(bool(plans))
    with progress.stage("load"):
        planner = Planner.from_checkpoint(Path(checkpoint), decoder=DecoderSettings(name="scaffold"),
                                          max_prompt_tokens=max_prompt_tokens, schema=driving, dtype=load_dtype)
    policy = planner.image_policy
    capacity = planner.backend.capacity
    model = planner.backend.model  # type: ignore[attr-defined]
    quant_report: dict[str, Any] | None = None
    if recipe is not None:
        with progress.stage("quantize"):
            quant_report = _quantize(planner, recipe, calib, source.quantized)
    precision = recipe or "fp32"
    plugin = any(p.route == "plugin" for p in plans)
    with tempfile.TemporaryDirectory(prefix="blockpilot-export-") as tmp:
        root = Path(tmp)
        with progress.stage("onnx", total=1 + int(plugin)) as stage:
            if recipe is None:
                spec = export_onnx(model, root, capacity, image_sizes=sizes, policy=policy, dtype="auto")
            else:
                from .quant_onnx import export_quantized_onnx

                spec = export_quantized_onnx(model, root, capacity, image_sizes=sizes, policy=policy)["spec"]
            progress.advance(stage, "decomposed")
            if plugin:
                from .plugin_attention import export_plugin_graph

                export_plugin_graph(model, root / "plugin", capacity)
                progress.advance(stage, "plugin")
        # The graphs hold everything from here on: the model goes before the engine builds, whose peak is the
        # graph's weights held by the parser and the builder, not the model's as well.
        del model, planner
        gc.collect()
        with BundleWriter(out, overwrite=overwrite, sign=sign) as writer:  # sign: signs the manifest (Ed25519)
            writer.add_model(checkpoint, weights=with_weights)
            write_schema_file(writer, driving, Path(checkpoint), root, explicit=schema is not None)
            writer.precision_map = quant_report["precision"] if quant_report else {}
            if quant_report:
                writer.recipe = quant_report["recipe"]
            io: dict[str, Any] = {"spec": spec}
            for graph in vision_graphs(spec["vision"]) if spec.get("vision") else []:
                writer.add_graph(root / graph["file"], role="vision", variant=VARIANT, precision=precision,
                                 io={**io, "graph": graph})
            writer.add_graph(root / LM_FILE, role="lm_step", variant=VARIANT, precision=precision, io=io,
                             extra_files=[*([root / EMBED_FILE] if "embed_file" in spec else []), root / SPEC_FILE])
            if plugin:
                writer.add_graph(root / "plugin" / LM_FILE, role="lm_step", variant="plugin", precision=precision,
                                 io=io)
            if plans:
                roles = 1 + (len(vision_graphs(spec["vision"])) if spec.get("vision") else 0)
                with progress.stage("engines", total=roles * len(plans)) as stage:
                    _add_engines(writer, root, spec, plans, lambda what: progress.advance(stage, what),
                                 timing_cache)
            with progress.stage("bundle"):
                writer.finish()  # hashes, manifest, atomic rename
                bundle = load_bundle(out)  # hashes checked once more, as the car will
    return _summary(bundle, capacity, dict(progress.seconds), precision)


def export_dtype(checkpoint: str | Path, dtype: str = "auto", *, float32_only: bool = False) -> str:
    """The dtype ``blockpilot export`` loads and traces ``checkpoint`` in: for ``auto``, the dtype its safetensors
    store (:func:`blockpilot.vla.checkpoint.stored_dtype`: bf16 / fp16, float32 when mixed); ``float32`` on request or
    where the stage needs it (``float32_only``: quantization, the plugin graph)."""
    if dtype not in EXPORT_DTYPES:
        raise BundleError(f"export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if dtype == "float32" or float32_only:
        return "float32"
    from ..runtime.plan_types import PlannerSetupError
    from ..vla.checkpoint import CheckpointError, stored_dtype

    try:
        return stored_dtype(checkpoint)
    except CheckpointError as exc:
        raise PlannerSetupError(str(exc)) from exc


def export_prompt_budget(checkpoint: str | Path, image_sizes: Sequence[tuple[int, int]], cameras: int) -> int:
    """The prompt budget of ``cameras`` frames, each as many tokens as the largest of ``image_sizes`` becomes
    under the checkpoint's image policy (text-only models: the text budget)."""
    from ..runtime.plan_types import PlannerSetupError
    from ..vla.config import ConfigError
    from ..vla.hf_config import load_config
    from ..vla.image_policy import ImagePolicyError, load_image_policy, prompt_budget

    if cameras < 1:
        raise BundleError(f"export --cameras must be at least 1, got {cameras}")
    try:
        config = load_config(checkpoint)
        if config.vision is None:
            return prompt_budget(None, 0)
        policy = load_image_policy(checkpoint, config.vision)
        biggest = max(image_sizes, key=lambda hw: policy.tokens(*hw))
        return prompt_budget(policy, cameras, image_hw=biggest)
    except (ConfigError, ImagePolicyError, FileNotFoundError, ValueError) as exc:
        raise PlannerSetupError(str(exc)) from exc


def _summary(bundle: Any, capacity: int, seconds: dict[str, float], recipe: str) -> ExportSummary:
    artifacts = []
    for a in bundle.artifacts:
        build = a.io.get("build", {}) if isinstance(a.io, dict) else {}
        artifacts.append({"kind": a.kind, "path": a.path, "role": a.role, "variant": a.variant,
                          "precision": a.precision, "target": a.target, "bytes": int(bundle.files[a.path]["bytes"]),
                          "build_s": build.get("seconds") if isinstance(build, dict) else None})
    counts: dict[str, int] = {}
    for labels in bundle.precision_map.values():
        for label in (labels.values() if isinstance(labels, dict) else [labels]):
            counts[str(label)] = counts.get(str(label), 0) + 1
    files = {rel: int(info["bytes"]) for rel, info in bundle.files.items()}
    return ExportSummary(bundle.path, files, capacity, seconds, tuple(artifacts), counts, recipe)


def _plan_engines(targets: tuple[str, ...], precision: str, recipe: str | None, attention: str) -> list[_EnginePlan]:
    """Resolve and check every target before any work: the recipe gate, the precision, the TensorRT here."""
    if attention not in ("auto", *ATTENTION_ROUTES):
        raise BundleError(f"attention must be auto or one of {', '.join(ATTENTION_ROUTES)}, got {attention!r}")
    if not targets:
        return []
    from ..quant.recipes import resolve_recipe
    from ..quant.targets import check_recipe
    from .trt_build import load_tensorrt

    resolved = [resolve_engine_target(t) for t in targets]
    for target in resolved:
        if recipe is not None:
            check_recipe(resolve_recipe(recipe), target.gate)
        if precision not in target.precisions:
            raise EngineTargetError(f"target {target.name} builds {', '.join(target.precisions)} engines, not "
                                    f"{precision}")
    trt = load_tensorrt()
    here = current_compute_capability()
    plans = []
    for target in resolved:
        check_buildable_here(target, trt, here)
        plans.append(_EnginePlan(target, precision, attention_route(target, trt.flavor, trt.version, attention)))
    return plans


def _quantize(planner: Any, recipe: str, calib: int, saved: Path | None = None) -> dict[str, Any]:
    """Quantize the planner's model in place with ``recipe`` (targets' gates were checked before), or restore the
    quantize output ``saved`` onto it."""
    if saved is not None:
        from ..quant.apply import QuantizedCheckpointError, load_quantized, read_precision_file

        try:
            load_quantized(planner.backend.model, saved)
        except QuantizedCheckpointError as exc:
            raise BundleError(str(exc)) from None
        info = read_precision_file(saved)
        return {"precision": info["precision"], "recipe": info["recipe"]}
    from ..calibration import synthetic_calibration_source
    from ..quant.pipeline import quantize_planner
    from ..quant.recipes import resolve_recipe

    report, _, _, _ = quantize_planner(planner, resolve_recipe(recipe), synthetic_calibration_source(4), calib)
    return {"precision": report.precision, "recipe": resolve_recipe(recipe).to_dict()}


def _lm_source(tmp: Path, route: str, precision: str) -> Path:
    """The graph the LM-step engine is built from for ``route`` in ``precision`` (rewritten once, cached in tmp)."""
    from .cache_io import fp16_cache_io
    from .fp16_graph import KV_CACHE_IO, to_fp16_graph
    from .native_attention import to_native_attention

    source = tmp / "plugin" / LM_FILE if route == "plugin" else tmp / LM_FILE
    if route == "native":
        native = tmp / f"{source.stem}.native.onnx"
        if not native.is_file():  # the pattern is matched on the exported float32 graph
            to_native_attention(source, native)
        source = native
    if precision == "fp16":  # computes in fp16; the KV cache I/O is fp16 too (the runtime's cache follows it)
        half = source.with_name(f"{source.stem}.fp16.onnx")
        if not half.is_file():
            to_fp16_graph(source, half, fp16_io=KV_CACHE_IO)
        source = half
    elif precision == "fp8":  # fp32 activations around FP8 Q/DQ: only the cache I/O becomes fp16
        half = source.with_name(f"{source.stem}.fp16cache.onnx")
        if not half.is_file():
            fp16_cache_io(source, half)
        source = half
    return source  # fp32 engines keep an fp32 cache


def kv_cache_record(network_json: Path | None) -> dict[str, Any] | None:
    """The manifest's ``kv_cache`` entry of an LM-step engine from its parsed network's I/O types: the numpy dtype
    the runtime keeps the cache in and each cache tensor's TensorRT type; ``None`` without a network summary."""
    import json

    from .fp16_graph import KV_CACHE_IO

    if network_json is None or not network_json.is_file():
        return None
    summary = json.loads(network_json.read_text())
    kinds = {t["name"]: t["dtype"] for t in [*summary.get("inputs", []), *summary.get("outputs", [])]
             if t["name"] in KV_CACHE_IO}
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8_e4m3fn"}
    return {"dtype": names.get(kinds.get("past_k", ""), kinds.get("past_k")), "tensors": kinds}


def _add_engines(writer: BundleWriter, tmp: Path, spec: dict[str, Any], plans: list[_EnginePlan],
                 advance: Any, timing_cache: Path | None = None) -> None:
    from .fp16_graph import to_fp16_graph
    from .native_attention import build_native_engine
    from .trt_build import build_engine, load_tensorrt, profiles_from_spec

    trt = load_tensorrt()
    for plan in plans:
        target, precision = plan.target, plan.precision
        cc = target.sm if target.ahead_of_time else None
        # One engine per vision graph (one per exported camera size), then the LM step.
        jobs: list[tuple[str, str, dict[str, Any] | None]] = [
            ("vision", g["file"], g) for g in (vision_graphs(spec["vision"]) if spec.get("vision") else [])]
        for role, file, vision_graph in [*jobs, ("lm_step", LM_FILE, None)]:
            graph = tmp / file
            if not graph.is_file():
                continue
            route = plan.route if role == "lm_step" else VARIANT
            if role == "lm_step":
                source = _lm_source(tmp, route, precision)
            else:
                source = graph
                if precision == "fp16":
                    source = tmp / f"{graph.stem}.fp16.onnx"
                    if not source.is_file():
                        to_fp16_graph(graph, source)
            engine = tmp / target.name / f"{graph.stem}.{precision}.{route}.engine"
            engine.parent.mkdir(exist_ok=True)
            profiles = profiles_from_spec(spec, role)
            inspector, network = None, None
            if route == "native":  # fused attention kernels exist for fp16; fp32 / fp8-linear graphs may decompose
                built = build_native_engine(source, engine, profiles=profiles, compute_capability=cc,
                                            decomposable=precision != "fp16", timing_cache=timing_cache)
                assert built.build is not None
                report: dict[str, Any] = {**built.build.to_dict(), "attention_layers": built.attention_layers,
                                          "decomposable": built.decomposable}
                network = built.build.network
            elif route == "plugin":
                from .trt_plugin import build_plugin_engine

                result = build_plugin_engine(source, engine, spec=spec, trt=trt, timing_cache=timing_cache)
                report, network = result.to_dict(), result.network
            else:
                result = build_engine(source, engine, profiles=profiles, compute_capability=cc, trt=trt,
                                      timing_cache=timing_cache)
                report, network = result.to_dict(), result.network
            if report.get("inspector"):
                inspector = Path(report["inspector"])
            for key in ("engine", "inspector", "network"):  # the manifest names files, not the build's temp dir
                if report.get(key):
                    report[key] = Path(report[key]).name
            io: dict[str, Any] = {"build": report} if vision_graph is None else {"build": report,
                                                                                   "graph": vision_graph}
            if role == "lm_step":  # the cache dtype, for a reader of the manifest (the runtime reads the engine)
                io["kv_cache"] = kv_cache_record(network)
            writer.add_engine(engine, target=target.name, sm=target.sm, role=role, variant=route,
                              precision=precision, io=io, inspector=inspector,
                              extra_files=[network] if network is not None and network.is_file() else [])
            advance(f"{graph.stem if role == 'vision' else role} {target.name}")


def graphs_dir(bundle_path: str | Path) -> Path:
    return Path(bundle_path) / "graphs" / VARIANT
