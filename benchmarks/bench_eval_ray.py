"""Replay throughput: one process against 2 local Ray workers (1 thread each), in one run (``eval --ray``).

The demo's held-out replay (generated scenes from the held-out seeds, written as nuScenes) planned by the shipped
reference model (``--checkpoint``, torch, default) or a bundle of it (``--bundle``, ONNX Runtime). Each side opens
its planners first (Ray's start and the workers' model loads are not timed: they are paid once per run, however
long the dataset), then the replay into a fresh ``results.jsonl`` is timed, the driver writing every record. Prints
samples/s of each side and their ratio (target on a 2-core machine: >= 1.6x), and checks that both wrote the same
records (latency fields aside). Compare numbers from the same run only.

Usage: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_eval_ray.py [--scenes 2] [--workers 2] [--bundle DIR]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from blockpilot.eval.evaluator import run_evaluation
from blockpilot.eval.nuscenes import NuScenesSource
from blockpilot.eval.ray_pool import RayPlannerPool, replay_mapper
from blockpilot.eval.ray_worker import WorkerSpec
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.sources import detect_source, open_planner
from blockpilot.sim.generator import generate_scene
from blockpilot.sim.writers.nuscenes import write_nuscenes
from blockpilot.vla.reference_model import SHIPPED_MODEL

HEADER = {"source": "bench", "checkpoint": "bench", "decoder": "scaffold", "schema": "bench"}


def _untimed(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    for r in records:
        if r.get("stats"):
            r["stats"].pop("stage_ms")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=2, help="held-out scenes (about 37 planned keyframes each)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, 1 thread each")
    parser.add_argument("--bundle", default=None, help="a bundle of the model (ONNX Runtime) instead of the checkpoint")
    args = parser.parse_args()
    found = detect_source(args.bundle or SHIPPED_MODEL)
    options = {"decoder": DecoderSettings(name="scaffold")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "heldout-nuscenes"
        write_nuscenes([generate_scene(HELDOUT_SEED_BASE + i) for i in range(args.scenes)], root)
        source = NuScenesSource(root)
        if found.kind != "bundle":
            import torch

            torch.set_num_threads(1)
        planner = open_planner(found, threads=1, **options)
        start = time.perf_counter()
        one = run_evaluation(planner, source, Path(tmp) / "one", header=HEADER, progress=False)
        one_s = time.perf_counter() - start
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            with RayPlannerPool(WorkerSpec(found, options, threads=1), args.workers) as pool:
                pool.pids()  # every worker has opened its planner
                start = time.perf_counter()
                run_evaluation(None, source, Path(tmp) / "ray", header=HEADER, progress=False,
                               map_samples=replay_mapper(pool))
                ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        same = _untimed(Path(tmp) / "one" / "results.jsonl") == _untimed(Path(tmp) / "ray" / "results.jsonl")
    n, planned = one.written, one.counts["ok"] + one.counts["parse_error"]
    print(f"{found.kind} on {found.default_backend}, {args.scenes} held-out scenes: {n} samples ({planned} planned)")
    print(f"one process (1 thread)       {n / one_s:6.2f} samples/s  ({one_s:.1f} s)")
    print(f"{args.workers} Ray workers (1 thread each) {n / ray_s:6.2f} samples/s  ({ray_s:.1f} s)")
    print(f"ratio {one_s / ray_s:.2f}x; same records: {same}")


if __name__ == "__main__":
    main()
