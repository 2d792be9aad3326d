"""Polygraphy comparisons for ``blockpilot verify``: a bundle's TensorRT engines against its ONNX graphs on ONNX
Runtime, over REAL feeds, with every tolerance and difference reported.

Feeds are the exact inputs of the LM-step graph during real plans: the bundle's ONNX Runtime planner plans
held-out generated observations (:func:`blockpilot.eval.synthetic.heldout_keyframes`) and the feeds of its
prefill and first decode steps are recorded (prompt embeddings with image features, M-RoPE positions, the
KV cache as it stands). The vision engine gets the observations' camera images as patches.
``Comparator.run`` runs both runners on them; :class:`polygraphy.comparator.SimpleCompareFunc` (the
non-deprecated form of ``CompareFunc.simple``) checks each output's largest absolute difference against its
``atol`` (or largest relative difference against ``rtol``); ``top1`` is judged by its agreement rate instead.

:func:`compare_graphs` runs two ONNX graphs on ONNX Runtime the same way (CPU), e.g. the decomposed LM step
against its fp16 rewrite; :func:`compare_engine` puts a ``TrtRunner`` on the engine where a GPU runs it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.bundle import Bundle, load_bundle
from ..runtime.backend import BackendError

Feed = dict[str, np.ndarray]
# Per engine precision: (absolute tolerance per output, the smallest top-1 agreement that passes); k_new / v_new
# are the window I/O's cache outputs, present_k / present_v those of graphs made before it.
TOLERANCES: dict[str, tuple[dict[str, float], float]] = {
    name: ({"prob": prob, **dict.fromkeys(("k_new", "v_new", "present_k", "present_v", "features"), kv)}, top1)
    for name, prob, kv, top1 in (("fp32", 1e-3, 1e-3, 0.99), ("fp16", 5e-2, 5e-2, 0.9), ("fp8", 0.15, 0.25, 0.8))
}


class EngineVerifyError(BackendError):
    """The engines cannot be compared here (no GPU, no TensorRT, no engine for this GPU, no Polygraphy)."""


@dataclass(frozen=True)
class OutputDiff:
    """One output's differences over all feeds (largest over iterations; mean of the per-feed means)."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    atol: float
    rtol: float
    passed: bool


@dataclass(frozen=True)
class GraphComparison:
    role: str
    reference: str
    candidate: str
    feeds: int
    outputs: tuple[OutputDiff, ...]
    top1_agreement: float | None  # None where the graph has no top1 output
    top1_positions: int
    min_top1_agreement: float

    @property
    def passed(self) -> bool:
        top1 = self.top1_agreement is None or self.top1_agreement >= self.min_top1_agreement
        return top1 and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def text(self) -> str:
        rows = [f"{self.role:<8} {self.candidate}  vs  {self.reference}  ({self.feeds} feeds)",
                f"  {'output':<10} {'max|diff|':>10} {'max rel':>10} {'mean|diff|':>10} {'atol':>8} {'rtol':>8}"]
        rows += [f"  {o.name:<10} {o.max_abs:>10.2e} {o.max_rel:>10.2e} {o.mean_abs:>10.2e} {o.atol:>8.0e} "
                 f"{o.rtol:>8.0e}  {'ok' if o.passed else 'EXCEEDS'}" for o in self.outputs]
        if self.top1_agreement is not None:
            ok = self.top1_agreement >= self.min_top1_agreement
            rows.append(f"  top1 agreement {self.top1_agreement:.2%} of {self.top1_positions} positions (needs >= "
                        f"{self.min_top1_agreement:.0%})  {'ok' if ok else 'BELOW'}")
        return "\n".join(rows)


def _runner_outputs(run_results: Any) -> list[list[Mapping[str, np.ndarray]]]:
    return [[{k: np.asarray(v) for k, v in it.items()} for it in iterations] for _, iterations in run_results]


def _compare(role: str, runners: Sequence[Any], names: tuple[str, str], feeds: Sequence[Feed],
             atol: Mapping[str, float], rtol: Mapping[str, float] | float, min_top1: float) -> GraphComparison:
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    if not feeds:
        raise ValueError(f"{role}: no feeds to compare on")
    atol = {**atol, "top1": float("inf")}  # judged by agreement below, not by an id difference
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the comparison is reported here, not logged
            results = Comparator.run(list(runners), data_loader=list(feeds))
            accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
                atol={"": 0.0, **atol}, rtol=rtol, check_error_stat="max"))
    except PolygraphyException as exc:
        raise EngineVerifyError(f"{role}: Polygraphy could not run {names[1]} against {names[0]}: {exc}") from exc
    (per_iteration,) = accuracy[0].values()
    diffs = []
    for name in (n for n in per_iteration[0] if n != "top1"):
        stats = [it[name] for it in per_iteration]
        threshold = stats[0].thresholds
        diffs.append(OutputDiff(name, max(s.max_absdiff for s in stats), max(s.max_reldiff for s in stats),
                                float(np.mean([s.mean_absdiff for s in stats])), float(threshold.atol),
                                float(threshold.rtol), all(bool(s) for s in stats)))
    reference, candidate = _runner_outputs(results)
    agreement, positions = None, 0
    if "top1" in reference[0]:
        same = [np.asarray(a["top1"]) == np.asarray(b["top1"]) for a, b in zip(reference, candidate, strict=True)]
        positions = sum(s.size for s in same)
        agreement = float(sum(int(s.sum()) for s in same)) / max(positions, 1)
    return GraphComparison(role, names[0], names[1], len(feeds), tuple(diffs), agreement, positions, min_top1)


def compare_graphs(reference: str | Path, candidate: str | Path, feeds: Sequence[Feed], *, role: str = "lm_step",
                   atol: Mapping[str, float] | None = None, rtol: Mapping[str, float] | float = 0.0,
                   min_top1_agreement: float = 1.0) -> GraphComparison:
    """Two ONNX graphs with the same I/O on ONNX Runtime (CPU) through Polygraphy, over ``feeds``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners = [OnnxrtRunner(SessionFromOnnx(str(p), providers=["cpu"]), name=f"onnxruntime:{Path(p).name}")
               for p in (reference, candidate)]
    return _compare(role, runners, (str(reference), str(candidate)), feeds, atol or TOLERANCES["fp32"][0], rtol,
                    min_top1_agreement)


def compare_engine(reference: str | Path, engine: str | Path, feeds: Sequence[Feed], *, flavor: str = "tensorrt",
                   role: str = "lm_step", atol: Mapping[str, float] | None = None,
                   rtol: Mapping[str, float] | float = 0.0, min_top1_agreement: float = 1.0,
                   plugin: bool = False) -> GraphComparison:
    """An ONNX graph on ONNX Runtime against a TensorRT engine (``flavor``: ``tensorrt`` or ``tensorrt_rtx``, the
    module that built it) through Polygraphy's ``TrtRunner``, over ``feeds``; needs a GPU that runs the engine.
    ``plugin``: the engine holds ``BlockDiffusionAttention`` layers (registered here before it is loaded)."""
    from polygraphy import config
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    rtx = flavor == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and rtx != config.USE_TENSORRT_RTX:
        raise EngineVerifyError(f"Polygraphy's TensorRT backend is already loaded for the other flavor; a {flavor} "
                                "engine needs a fresh process (or POLYGRAPHY_USE_TENSORRT_RTX set accordingly)")
    config.USE_TENSORRT_RTX = rtx  # read when polygraphy.backend.trt is first imported
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    if plugin:
        from ..trt.compat import load_tensorrt
        from ..trt.plugin import register_plugin

        register_plugin(load_tensorrt(prefer=(flavor,)))
    runners = [OnnxrtRunner(SessionFromOnnx(str(reference), providers=["cpu"]), name="onnxruntime"),
               TrtRunner(EngineFromBytes(Path(engine).read_bytes()), name=flavor)]
    return _compare(role, runners, (str(reference), str(engine)), feeds, atol or TOLERANCES["fp32"][0], rtol,
                    min_top1_agreement)


def lm_feeds(bundle: str | Path, observations: Sequence[Any], *, steps: int = 2) -> list[Feed]:
    """LM-step feeds of real plans: for each observation the prefill and the first ``steps`` decode forwards of
    the bundle's ONNX Runtime planner (scaffold decoder), KV cache state included, recorded through the
    backend's :attr:`~blockpilot.runtime.ort_backend.OrtBackend.feed_observer`."""
    from ..runtime.ort_backend import OrtBackend
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import open_planner

    planner = open_planner(bundle, backend="onnxruntime", decoder=DecoderSettings(name="scaffold"), verify=False,
                           kinds=("bundle",), flag="bundle")
    backend = planner.backend
    assert isinstance(backend, OrtBackend)
    feeds: list[Feed] = []
    budget = 0

    def record(feed: Mapping[str, np.ndarray]) -> None:
        nonlocal budget
        if budget > 0:
            budget -= 1
            feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})

    backend.feed_observer = record
    for obs in observations:
        budget = 1 + steps
        planner.plan(obs)
    backend.feed_observer = None
    return feeds


def engine_lm_feeds(feeds: Sequence[Feed], typed_slots: bool, vocab_size: int,
                    cache_dtype: Any = None) -> list[Feed]:
    """``feeds`` (ONNX Runtime's, where a prefill or an unconstrained step leaves the typed-slot inputs to their
    defaults) made explicit for an engine: with ``typed_slots`` (an engine that takes ``allowed_table`` /
    ``token_class``) the defaults written out (one allow-all row, class 0 at every position); without (an engine
    built before them, which folded the defaults) both removed, so graph and engine run unconstrained. With
    ``cache_dtype`` (the engine's, e.g. float16) ``past_k`` / ``past_v`` are rounded to it, so the graph (which
    reads them back as float32) and the engine see the same cache."""
    names = ("allowed_table", "token_class")
    out = []
    if cache_dtype is not None:
        feeds = [{k: v.astype(cache_dtype) if k in ("past_k", "past_v") else v for k, v in f.items()} for f in feeds]
    for feed in feeds:
        if not typed_slots:
            out.append({k: v for k, v in feed.items() if k not in names})
        elif all(n in feed for n in names):
            out.append(dict(feed))
        else:
            t = int(feed["inputs_embeds"].shape[1])
            out.append({**feed, "allowed_table": np.ones((1, vocab_size), dtype=np.bool_),
                        "token_class": np.zeros((1, t), dtype=np.int64)})
    return out


def vision_feeds(spec: Mapping[str, Any], observations: Sequence[Any], *, limit: int = 8,
                 size: tuple[int, int] | None = None) -> list[Feed]:
    """``{"patches": ...}`` of the observations' camera images (at most ``limit``), preprocessed as the backends do;
    with ``size`` (an exported vision graph's ``(height, width)``) each image is resized to it by the export's
    policy."""
    from ..formats.onnx_spec import spec_policy
    from ..vla.image import image_patches
    from ..vla.image_policy import ImagePolicy

    vision = spec["vision"]
    policy = ImagePolicy(patch_size=int(vision["patch_size"]), merge_size=int(vision["spatial_merge_size"]),
                         temporal_patch_size=int(vision["temporal_patch_size"])) if size is None else \
        spec_policy(dict(vision), "onnx_spec.json").with_sizes((size,))
    images = [image for obs in observations for image in obs.images][:limit]
    return [{"patches": image_patches(np.asarray(image, dtype=np.uint8), policy)[0]} for image in images]


@dataclass(frozen=True)
class EngineVerifyReport:
    bundle: str
    compute_capability: str
    flavor: str
    samples: int
    comparisons: tuple[GraphComparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "backend": "tensorrt", "reference": "onnxruntime",
                "compute_capability": self.compute_capability, "flavor": self.flavor, "samples": self.samples,
                "comparisons": [c.to_dict() for c in self.comparisons], "passed": self.passed}

    def text(self) -> str:
        head = (f"verify   {self.bundle} (tensorrt engines, {self.flavor}, sm {self.compute_capability}) against its "
                f"ONNX graphs (onnxruntime), Polygraphy over real feeds of {self.samples} held-out observations")
        return "\n".join([head, *(c.text() for c in self.comparisons), "PASSED" if self.passed else "FAILED"])


def tensorrt_unavailable(bundle: Bundle) -> str | None:
    """Why the engines of ``bundle`` cannot be verified here, or ``None`` when they can."""
    from ..runtime.cuda_memory import CudaUnavailableError, compute_capability
    from ..runtime.trt_backend import EngineSelectionError, engine_flavor, select_engines

    if not bundle.engines():
        return "the bundle holds no engines"
    try:
        engines = select_engines(bundle, compute_capability())
    except (CudaUnavailableError, EngineSelectionError) as exc:
        return str(exc)
    plugin = ("torch", "triton") if engines["lm_step"].variant == "plugin" else ()  # the plugin's kernel
    for module in (engine_flavor(engines["lm_step"]), "polygraphy", *plugin):
        if importlib.util.find_spec(module) is None:
            return f"the {module} module is not installed"
    return None


def verify_engines(bundle: str | Path | Bundle, *, samples: int = 8, steps: int = 2, precision: str | None = None,
                   variant: str | None = None) -> EngineVerifyReport:
    """Each engine of ``bundle`` for this GPU (:func:`blockpilot.runtime.trt_backend.select_engines`) against the
    graph it came from, over real feeds of ``samples`` held-out observations, with :data:`TOLERANCES` of the
    engine's precision."""
    from ..eval.synthetic import heldout_keyframes, observation
    from ..formats.onnx_spec import load_spec
    from ..runtime.cuda_memory import CudaUnavailableError, compute_capability
    from ..runtime.trt_backend import EngineSelectionError, engine_flavor, select_engines

    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    try:
        cc = compute_capability()
        engines = select_engines(loaded, cc, precision=precision, variant=variant)
    except (CudaUnavailableError, EngineSelectionError) as exc:
        raise EngineVerifyError(f"verify --backend tensorrt: {exc}") from exc
    graphs = {a.role: a for a in loaded.graphs(variant="decomposed") if a.role == "lm_step"}
    frames = heldout_keyframes(max(1, (samples + 9) // 10), stride=4)[:samples]
    observations = [observation(f) for f in frames]
    spec = load_spec(loaded.file(graphs["lm_step"].path).parent)
    # The typed-slot inputs as the LM engine takes them (its build's profiles say).
    profiles = (engines["lm_step"].io.get("build") or {}).get("profiles") or {}
    cache = (engines["lm_step"].io.get("kv_cache") or {}).get("dtype")  # recorded since the fp16 cache I/O
    jobs = [("lm_step", graphs["lm_step"], engines["lm_step"],
             engine_lm_feeds(lm_feeds(loaded.path, observations, steps=steps), "allowed_table" in profiles,
                             int(spec["vocab_size"]), cache_dtype=cache if cache in ("float16", "float32") else None))]
    if "vision" in engines:  # every camera size's engine against its own graph, the frames resized to its size
        jobs += _vision_jobs(loaded, engines["vision"], spec, observations)
    comparisons = []
    for role, graph, engine, role_feeds in jobs:
        atol, min_top1 = TOLERANCES.get(engine.precision, TOLERANCES["fp16"])
        comparisons.append(compare_engine(loaded.file(graph.path), loaded.file(engine.path), role_feeds,
                                          flavor=engine_flavor(engine), role=role, atol=atol,
                                          min_top1_agreement=min_top1, plugin=engine.variant == "plugin"))
    return EngineVerifyReport(str(loaded.path), cc, engine_flavor(engines["lm_step"]), len(frames), tuple(comparisons))


def _vision_jobs(bundle: Bundle, chosen: Any, spec: Mapping[str, Any],
                 observations: Sequence[Any]) -> list[tuple[str, Any, Any, list[Feed]]]:
    """``(role, graph, engine, feeds)`` for each vision engine built like ``chosen``, paired with the vision graph
    of its patch grid (an older export: its one graph, with the observations as they are)."""
    from ..runtime.trt_vision import artifact_grid, graph_sizes, vision_engine_artifacts

    graphs = [a for a in bundle.graphs(variant="decomposed") if a.role == "vision"]
    sizes = graph_sizes(dict(spec))
    jobs = []
    for grid, engine in vision_engine_artifacts(bundle, chosen).items():
        graph = next((g for g in graphs if artifact_grid(g) == grid), graphs[0])
        size = None if grid is None else sizes[grid]
        jobs.append(("vision", graph, engine, vision_feeds(spec, observations, size=size)))
    return jobs
