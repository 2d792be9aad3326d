"""The plan rows of ``blockpilot bench``: one per backend, threads and decoder, made alike for the reference
checkpoint's plans (:mod:`.run`) and for an exported bundle's (``--bundle``: :func:`bundle_plans`, on ONNX Runtime,
the backend the bundle runs on without a GPU; a bundle holds no torch weights to time steps or AR with)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .shapes import BenchError


def plan_row(model: str, dtype: str, backend: str, threads: int | None, decoder: str, described: dict[str, Any],
             ms: float, plan: Any, cpu_target_ms: float | None) -> dict[str, Any]:
    """One plan row: p50 ``ms`` and the counts of the warm-up ``plan`` (deterministic); ``cpu_target_met`` on a CPU
    (``cpu_target_ms`` None elsewhere)."""
    stats = plan.stats
    row = {"model": model, "dtype": dtype, "backend": backend, "threads": threads, "decoder": decoder,
           "schema": described["kind"], "cameras": described["cameras"], "p50_ms": ms, "forwards": stats.forwards,
           "prefill_forwards": stats.prefill_forwards, "tokens": stats.tokens,
           "tokens_per_forward": stats.tokens_per_forward, "prompt_tokens": stats.prompt_tokens,
           "parsed": plan.error is None}
    if cpu_target_ms is not None:
        row["cpu_target_met"] = ms < cpu_target_ms
    return row


def bundle_precision(bundle: Any) -> str:
    """The precision of a loaded bundle's decomposed ``lm_step`` graph (``fp32`` or ``fp8``)."""
    return next((a.precision for a in bundle.graphs("decomposed") if a.role == "lm_step"), "fp32")


def bundle_plans(bundle_dir: Path, *, threads: tuple[int, ...], decoders: tuple[str, ...], cameras: int | None,
                 repeats: int, cpu_target_ms: float, trusted_keys: tuple[str, ...] = (),
                 log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Plan rows of the bundle at ``bundle_dir`` on ONNX Runtime (every ``threads`` count and decoder) and what
    they were planned on (:func:`~.observations.bench_observation`, with the bundle's schema)."""
    import functools

    import torch

    from ..runtime.bundle_planner import open_bundle
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import open_planner
    from .measure import p50_ms
    from .observations import bench_observation, check_plan_observation

    if "rollouts" in decoders:
        raise BenchError("--decoders rollouts: the rollouts decoder runs on torch, not on a bundle's ONNX Runtime "
                         "graphs; leave it out with --bundle")
    loaded = open_bundle(bundle_dir, trusted_keys=trusted_keys)
    precision = bundle_precision(loaded)
    rows: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    for count in threads:
        for decoder in decoders:
            planner = open_planner(loaded.path, backend="onnxruntime", decoder=DecoderSettings(name=decoder),
                                   threads=count, kinds=("bundle",), flag="--bundle", trusted_keys=trusted_keys)
            if not described:
                check_plan_observation(loaded.path, planner.schema, cameras)
                obs, described = bench_observation(loaded.path / "model", planner.schema, planner.image_policy,
                                                   cameras)
            plan = planner.plan(obs)  # the warm-up; counts are deterministic
            ms = p50_ms(functools.partial(planner.plan, obs), torch.device("cpu"), repeats, warmup=0)
            rows.append(plan_row("bundle", precision, "onnxruntime", count, decoder, described, ms, plan,
                                 cpu_target_ms))
            log(f"  plan bundle onnxruntime {precision:<5} threads={count} {decoder:<9} {ms:9.1f} ms")
    return rows, described
