"""A :class:`Planner` from a verified bundle: the car's entry point (no checkpoint, no torch for ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

from ..formats.bundle import BundleError, load_bundle
from .backend import BUNDLE_BACKENDS
from .plan_types import DecoderSettings, PlannerSetupError
from .planner import Planner


def planner_from_bundle(path: str | Path, *, decoder: DecoderSettings | None = None, backend: str = "onnxruntime",
                        threads: int = 1, verify: bool = True, max_prompt_tokens: int | None = None) -> Planner:
    """Load ``path`` (every file's size and sha256 checked against the manifest unless ``verify=False``)
    and build a planner on ``backend``: ``onnxruntime`` over its graphs, ``tensorrt`` over its engines for this
    GPU (:func:`blockpilot.runtime.trt_backend.trt_planner`); a tampered or incomplete bundle is refused.
    ``max_prompt_tokens`` lowers the prompt budget below what the export's KV cache holds (more is refused)."""
    if backend not in BUNDLE_BACKENDS:
        raise PlannerSetupError(f"bundle backend {backend!r}: this build runs bundles on {', '.join(BUNDLE_BACKENDS)}")
    if backend == "tensorrt":
        from .trt_backend import trt_planner

        return trt_planner(path, decoder=decoder, verify=verify, max_prompt_tokens=max_prompt_tokens)
    try:
        bundle = load_bundle(path, verify=verify)
    except BundleError as exc:
        raise PlannerSetupError(f"bundle refused: {exc}") from exc
    graphs = {a.role: a for a in bundle.graphs(variant="decomposed")}
    if "lm_step" not in graphs:
        raise PlannerSetupError(f"{bundle.path / 'manifest.json'}: no decomposed lm_step graph for ONNX Runtime")
    from .ort_backend import ort_planner

    return ort_planner(bundle.path / "model", bundle.file(graphs["lm_step"].path).parent, decoder=decoder,
                       threads=threads, max_prompt_tokens=max_prompt_tokens)
