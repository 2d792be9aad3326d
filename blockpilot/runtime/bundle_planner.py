"""A :class:`Planner` from a verified bundle: the car's entry point (no checkpoint, no torch for ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..formats.bundle import Bundle, BundleError, load_bundle
from .backend import BUNDLE_BACKENDS
from .plan_types import DecoderSettings, PlannerSetupError
from .planner import Planner


class BundleRefusedError(PlannerSetupError):
    """A bundle the runtime will not run: damaged, incomplete, or not signed by a trusted key. The message names
    the file (and key id); ``cause`` is the :class:`~blockpilot.formats.bundle.BundleError` saying why (a
    :class:`~blockpilot.formats.signing.SignatureError` for the signature's refusals)."""

    def __init__(self, cause: BundleError) -> None:
        self.cause = cause
        super().__init__(f"bundle refused: {cause}")


def open_bundle(path: str | Path, *, verify: bool = True, trusted_keys: Sequence[str | Path] = ()) -> Bundle:
    """:func:`~blockpilot.formats.bundle.load_bundle` for a planner: with ``trusted_keys`` (public key files) only a
    bundle signed by one of them, every file's sha256 checked; without, as before, with a warning logged when the
    bundle is signed (its signature goes unchecked). Raises :class:`BundleRefusedError`."""
    try:
        bundle = load_bundle(path, verify=verify, trusted_keys=trusted_keys)
    except BundleError as exc:
        raise BundleRefusedError(exc) from exc
    if not trusted_keys:
        from ..formats.signing import warn_unchecked

        warn_unchecked(bundle.path)
    return bundle


def planner_from_bundle(path: str | Path, *, decoder: DecoderSettings | None = None, backend: str = "onnxruntime",
                        threads: int = 1, verify: bool = True, max_prompt_tokens: int | None = None,
                        trusted_keys: Sequence[str | Path] = ()) -> Planner:
    """Load ``path`` (every file's size and sha256 checked against the manifest unless ``verify=False``; signed by
    one of ``trusted_keys`` when given: :func:`open_bundle`) and build a planner on ``backend``: ``onnxruntime``
    over its graphs, ``tensorrt`` over its engines for this GPU (:func:`blockpilot.runtime.trt_backend.trt_planner`);
    a tampered, incomplete or untrusted bundle is refused. ``max_prompt_tokens`` lowers the prompt budget below
    what the export's KV cache holds (more is refused)."""
    if backend not in BUNDLE_BACKENDS:
        raise PlannerSetupError(f"bundle backend {backend!r}: this build runs bundles on {', '.join(BUNDLE_BACKENDS)}")
    if backend == "tensorrt":
        from .trt_backend import trt_planner

        return trt_planner(path, decoder=decoder, verify=verify, max_prompt_tokens=max_prompt_tokens,
                           trusted_keys=trusted_keys)
    bundle = open_bundle(path, verify=verify, trusted_keys=trusted_keys)
    graphs = {a.role: a for a in bundle.graphs(variant="decomposed")}
    if "lm_step" not in graphs:
        raise PlannerSetupError(f"{bundle.path / 'manifest.json'}: no decomposed lm_step graph for ONNX Runtime")
    from .ort_backend import ort_planner

    return ort_planner(bundle.path / "model", bundle.file(graphs["lm_step"].path).parent, decoder=decoder,
                       threads=threads, max_prompt_tokens=max_prompt_tokens)
