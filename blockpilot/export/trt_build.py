"""Ahead-of-time TensorRT engine builds from the exported ONNX graphs (no GPU needed with TensorRT-RTX).

Two flavors share one code path: ``tensorrt`` proper (JetPack's TensorRT 10.x on the car, builds for the GPU
it runs on) and ``tensorrt_rtx`` (TensorRT-RTX: builds on a CPU-only workstation for chosen compute
capabilities; its engines run on SM 8.0/8.6/8.9/12.x). Networks are always STRONGLY TYPED: the precision comes
from the graph's tensor types and Q/DQ nodes, never from builder precision flags, so an fp16 engine needs an
fp16 graph (:func:`to_fp16_graph`).

TensorRT-RTX builds no plugin layers, and its ONNX parser aborts the whole process on a node in a custom
domain, so such graphs are refused before the parser sees them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from ..errors import BlockpilotError
from ..formats.onnx_spec import graph_has_typed_slots
from ..trt.compat import TensorRT, load_tensorrt
from ..trt.compat import TrtUnavailableError as TrtUnavailableError  # moved to blockpilot.trt; re-exported here

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
Shape = Sequence[int]
Profiles = Mapping[str, tuple[Shape, Shape, Shape]]


class PluginGraphError(BlockpilotError, ValueError):
    """The graph holds nodes in a non-standard ONNX domain (plugin layers) that this TensorRT cannot build."""


class EngineBuildError(BlockpilotError, RuntimeError):
    """Parsing or building failed; the message carries the parser's errors or points at the TensorRT log."""


# -- small helpers that hide the API differences -------------------------------------------------------------


def _strongly_typed_network(trt: TensorRT, builder: Any) -> Any:
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flag)


def _set_compute_capability(trt: TensorRT, config: Any, cc: str | None) -> str:
    """Target ``cc`` ("8.9", "12.0", "sm89"); returns what the engine is built for."""
    if not trt.is_rtx:
        return "current-gpu"  # TensorRT proper builds for the GPU it runs on
    if cc is None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
        return "current-gpu"
    digits = cc.lower().removeprefix("sm").replace(".", "").replace("_", "")
    member = getattr(trt.ComputeCapability, f"SM{digits}", None)
    if member is None:
        known = [m for m in dir(trt.ComputeCapability) if m.startswith("SM")]
        raise ValueError(f"compute capability {cc!r} is not one TensorRT-RTX {trt.version} builds for: {known}")
    config.num_compute_capabilities = 1
    if not config.set_compute_capability(member, 0):
        raise EngineBuildError(f"TensorRT-RTX refused compute capability {cc}")
    return f"{digits[:-1]}.{digits[-1]}"


def _enable_preview_features(trt: TensorRT, config: Any, names: Sequence[str]) -> None:
    """Turn on each ``trt.PreviewFeature`` of ``names``; an unknown name raises, naming the ones there are."""
    for name in names:
        member = getattr(trt.PreviewFeature, name, None)
        if member is None:
            known = [m for m in dir(trt.PreviewFeature) if m.isupper()]
            raise ValueError(f"{trt.flavor} {trt.version} has no preview feature {name!r} (it has {known})")
        config.set_preview_feature(member, True)


def _attach_timing_cache(trt: TensorRT, config: Any, path: Path | None) -> tuple[Any, str]:
    """(cache object or None, a note for the report). TensorRT-RTX made timing caches no-ops (since 1.2)."""
    if path is None:
        return None, "not requested"
    if trt.is_rtx:
        return None, "unsupported: timing cache operations are no-ops in TensorRT-RTX (it caches at runtime)"
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)
    return cache, "reused" if blob else "created"


def _save_timing_cache(config: Any, path: Path) -> None:
    atomic_write(path, bytes(config.get_timing_cache().serialize()))


def _cuda_device_present() -> bool:
    """A cheap guess (device nodes of a desktop driver, WSL or Jetson) so CPU-only hosts skip a noisy failure."""
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/dxg", "/dev/nvhost-gpu", "/dev/nvgpu/igpu0"))


def _inspect(trt: TensorRT, logger: Any, engine_bytes: Any, out: Path) -> tuple[Path | None, str, int | None]:
    """Write the inspector's layer JSON; needs a CUDA device to deserialize, so on CPU it says why not."""
    if trt.is_rtx and not _cuda_device_present():
        return None, "skipped: the engine inspector needs a CUDA device to deserialize the engine; none here", None
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    except Exception as exc:  # any failure here only means no inspector output
        return None, f"engine could not be deserialized here: {exc}", None
    if engine is None:
        return None, "engine inspector needs a CUDA device (deserialization failed on this machine)", None
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    atomic_write(out, info.encode())
    layers = json.loads(info).get("Layers")
    return out, "written", len(layers) if isinstance(layers, list) else None


def network_summary(trt: TensorRT, network: Any) -> dict[str, Any]:
    """What the parsed (strongly typed) network holds before the build: its inputs and outputs (name, shape with
    -1 for a dynamic dimension, data type, whether a shape tensor), every layer's type and output types,
    counts per layer type and per output precision, and the attention / plugin / Q-DQ layers found. Written
    beside each engine, it is the build-side half of the inspector (the engine inspector needs a GPU)."""
    layers: list[dict[str, Any]] = []
    types: dict[str, int] = {}
    precisions: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).split(".")[-1]
        outs = [str(layer.get_output(j).dtype).split(".")[-1] for j in range(layer.num_outputs)]
        layers.append({"name": layer.name, "type": kind, "outputs": outs})
        types[kind] = types.get(kind, 0) + 1
        if outs:
            precisions[outs[0]] = precisions.get(outs[0], 0) + 1
    def io(tensors: list[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": [int(d) for d in t.shape], "dtype": str(t.dtype).split(".")[-1],
                 "shape_tensor": bool(t.is_shape_tensor)} for t in tensors]

    inputs = io([network.get_input(i) for i in range(network.num_inputs)])
    outputs = io([network.get_output(i) for i in range(network.num_outputs)])
    return {"flavor": trt.flavor, "version": trt.version, "inputs": inputs, "outputs": outputs,
            "layers": len(layers), "layer_types": types,
            "output_precisions": precisions, "attention_layers": types.get("ATTENTION_INPUT", 0),
            "plugin_layers": types.get("PLUGIN_V3", 0) + types.get("PLUGIN_V2", 0) + types.get("PLUGIN", 0),
            "qdq_layers": types.get("QUANTIZE", 0) + types.get("DEQUANTIZE", 0), "per_layer": layers}


# -- graph checks and profiles -------------------------------------------------------------------------------


def all_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_nodes(sub)


def custom_domain_nodes(model: Any) -> list[str]:
    """``"domain::OpType (name)"`` of every node (subgraphs and local functions too) outside the standard domains."""
    nodes = list(all_nodes(model.graph)) + [n for f in model.functions for n in f.node]
    return [f"{n.domain}::{n.op_type} ({n.name or 'unnamed'})" for n in nodes if n.domain not in STANDARD_DOMAINS]


FP8_CAPABLE = ("8.9", "12.0", "12.1")  # Ada and Blackwell; Ampere (8.0/8.6) has no fp8 tensor cores


def uses_fp8(model: Any) -> bool:
    """Whether any initializer, constant or Cast target of the graph is a float8 type (FP8 Q/DQ)."""
    from onnx import TensorProto

    fp8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}
    if any(t.data_type in fp8 for t in model.graph.initializer):
        return True
    for node in all_nodes(model.graph):
        for attr in node.attribute:
            if (attr.name == "to" and attr.i in fp8) or (attr.HasField("t") and attr.t.data_type in fp8):
                return True
    return False


def check_buildable(onnx_path: str | Path, flavor: str, compute_capability: str | None = None) -> None:
    """Refuse, without calling the TensorRT parser, a graph with plugin nodes when the flavor is TensorRT-RTX,
    and an FP8 graph for a compute capability without fp8 (the builder fails late on those)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = custom_domain_nodes(model)
    if found and flavor == "tensorrt-rtx":
        listed = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
        raise PluginGraphError(f"{onnx_path}: TensorRT-RTX builds no plugin layers, and this graph holds "
                               f"{len(found)} node(s) in a custom domain ({listed}); export the decomposed variant")
    if flavor == "tensorrt-rtx" and compute_capability is not None and uses_fp8(model):
        cc = compute_capability.lower().removeprefix("sm").replace(".", "")
        if f"{cc[:-1]}.{cc[-1]}" not in FP8_CAPABLE:
            raise ValueError(f"{onnx_path}: an FP8 graph needs compute capability {' / '.join(FP8_CAPABLE)}, "
                             f"not {compute_capability}")


# Typed value slots in an engine: a schema may use up to MAX_SLOT_CLASSES allowed-token classes (the shipped
# presets use 16 (driving) and 9 (robot) on the reference tokenizer); the engine's ``allowed_table`` takes one
# row more, the allow-all row the TensorRT backend keeps at row 0 for unconstrained steps.
MAX_SLOT_CLASSES = 64
SLOT_TABLE_ROWS = MAX_SLOT_CLASSES + 1


def profiles_from_spec(spec: Mapping[str, Any], role: str, opt_tokens: int | None = None) -> dict[str, Any]:
    """Profile ranges for a graph of :func:`blockpilot.export.onnx_graphs.export_onnx`: for ``lm_step``, T from 1
    to the cache capacity (opt: one block) and the shape-tensor input ``key_end`` over the same range; where the
    graph has the typed-slot inputs, ``allowed_table`` ``(C, V)`` with C from 1 to :data:`SLOT_TABLE_ROWS` (opt:
    the maximum, which the backend always feeds) and ``token_class`` ``(1, Tc)`` with Tc over T's range."""
    if role == "vision":
        return {}  # the vision graph is fully static (its grid is fixed at export)
    if role != "lm_step":
        raise ValueError(f"unknown graph role {role!r}")
    cap, hidden = int(spec["capacity"]), int(spec["hidden_size"])
    opt = min(cap, opt_tokens or int(spec["block_size"]))
    profiles: dict[str, Any] = {"inputs_embeds": ((1, 1, hidden), (1, opt, hidden), (1, cap, hidden)),
                                "position_ids": ((3, 1, 1), (3, 1, opt), (3, 1, cap)),
                                "key_end": ((1,), (opt,), (cap,))}
    if graph_has_typed_slots(dict(spec)):
        vocab = int(spec["vocab_size"])
        profiles["allowed_table"] = ((1, vocab), (SLOT_TABLE_ROWS, vocab), (SLOT_TABLE_ROWS, vocab))
        profiles["token_class"] = ((1, 1), (1, opt), (1, cap))
    return profiles


def input_defaults(onnx_path: str | Path, names: Sequence[str]) -> list[str]:
    """Which of ``names`` are graph inputs of ``onnx_path`` that also carry a default (an initializer of the
    same name, as the typed-slot inputs of :mod:`blockpilot.export.typed_slots_graph` do)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    return [t.name for t in model.graph.initializer if t.name in inputs and t.name in names]


def without_defaults(onnx_path: str | Path, names: Sequence[str]) -> bytes:
    """``onnx_path`` serialized with the defaults of the inputs ``names`` dropped, so a TensorRT parser makes
    them real network inputs instead of folding them into constants. External data stays where it is (parse
    the bytes with ``path=onnx_path``)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return bytes(model.SerializeToString())


def _add_profile(builder: Any, config: Any, network: Any, profiles: Profiles) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if t.is_shape_tensor or any(d < 0 for d in t.shape)]
    missing = [n for n in dynamic if n not in profiles]
    unknown = [n for n in profiles if n not in {t.name for t in inputs}]
    if missing or unknown:
        raise ValueError(f"profiles: missing ranges for {missing}, unknown inputs {unknown}")
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        if tensor.name not in profiles:
            continue
        lo, opt, hi = (tuple(int(v) for v in s) for s in profiles[tensor.name])
        if tensor.is_shape_tensor:  # the values it takes (key_end feeds a Range), not its shape
            profile.set_shape_input(tensor.name, lo, opt, hi)
        else:
            profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)


# -- the build -----------------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    engine: Path
    seconds: float
    engine_bytes: int
    flavor: str
    version: str
    compute_capability: str
    network_layers: int
    engine_layers: int | None
    inspector: Path | None
    inspector_note: str
    timing_cache: Path | None
    timing_cache_note: str
    profiles: dict[str, Any] = field(default_factory=dict)
    network: Path | None = None  # <engine>.network.json: the parsed network's layers and precisions

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("engine", "inspector", "timing_cache", "network"):
            out[key] = None if out[key] is None else str(out[key])
        out["profiles"] = {k: [list(s) for s in v] for k, v in self.profiles.items()}
        return out


def parse_network(trt: TensorRT, logger: Any, onnx_path: Path, inputs: Sequence[str] = ()) -> tuple[Any, Any]:
    """(builder, strongly typed network) parsed from ``onnx_path`` (call :func:`check_buildable` first).
    ``inputs`` with a default in the graph stay network inputs (:func:`without_defaults`)."""
    builder = trt.Builder(logger)
    network = _strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    defaulted = input_defaults(onnx_path, inputs) if inputs else []
    parsed = parser.parse(without_defaults(onnx_path, defaulted), str(onnx_path)) if defaulted else \
        parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: the ONNX parser failed: {errors}")
    return builder, network


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, profiles: Profiles | None = None,
                 compute_capability: str | None = "8.9", timing_cache: Path | None = None,
                 trt: TensorRT | None = None, log_level: str = "ERROR",
                 network_hook: Callable[[TensorRT, Any], None] | None = None,
                 preview_features: Sequence[str] = ()) -> BuildReport:
    """Parse ``onnx_path`` into a strongly typed network, build it and write ``engine_path`` atomically.

    ``network_hook(trt, network)`` may adjust the parsed network's layers before the build;
    ``preview_features`` names ``trt.PreviewFeature`` members to enable (the plugin build's aliasing).

    ``profiles`` maps each dynamic input to ``(min, opt, max)`` shapes; for a shape-tensor input (``key_end``)
    the triples are its values. An input named there that has a default in the graph (the typed-slot inputs)
    is built as a real input: the parser sees a copy without the default, which it would fold to a constant.
    The inspector's layer JSON lands at ``<engine>.layers.json`` when a GPU can
    deserialize the engine (otherwise the report says why); the parsed network's summary
    (:func:`network_summary`) always lands at ``<engine>.network.json``.
    """
    trt = trt or load_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_buildable(onnx_path, trt.flavor, compute_capability)
    t0 = time.perf_counter()
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder, network = parse_network(trt, logger, onnx_path, tuple(profiles or {}))
    if network_hook is not None:
        network_hook(trt, network)
    summary = network_summary(trt, network)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names + tactics for the inspector
    if hasattr(trt.BuilderFlag, "TF32"):  # float32 layers stay IEEE float32, as ONNX Runtime and torch compute them
        config.clear_flag(trt.BuilderFlag.TF32)
    if trt.is_rtx and hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        # The runtime hands TensorRT-RTX its scratch memory; without this flag the context is not capturable
        # into a CUDA graph.
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    _enable_preview_features(trt, config, preview_features)
    cc = _set_compute_capability(trt, config, compute_capability)
    cache, cache_note = _attach_timing_cache(trt, config, timing_cache)
    _add_profile(builder, config, network, profiles or {})
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineBuildError(f"{onnx_path}: build_serialized_network failed (see the TensorRT log above)")
    seconds = time.perf_counter() - t0
    atomic_write(engine_path, memoryview(blob))
    network_json = engine_path.with_name(engine_path.name + ".network.json")
    atomic_write(network_json, (json.dumps(summary, indent=1) + "\n").encode())
    if cache is not None and timing_cache is not None:
        _save_timing_cache(config, timing_cache)
    layers_json = engine_path.with_name(engine_path.name + ".layers.json")
    inspector, note, engine_layers = _inspect(trt, logger, blob, layers_json)
    return BuildReport(engine_path, seconds, engine_path.stat().st_size, trt.flavor, trt.version, cc,
                       network.num_layers, engine_layers, inspector, note,
                       timing_cache if cache is not None else None, cache_note, dict(profiles or {}), network_json)
