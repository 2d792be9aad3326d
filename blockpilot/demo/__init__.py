"""``blockpilot demo``: the end-to-end CPU path as far as the project reaches today.

Reference checkpoint written in the HF layout -> loaded back through the real loader -> a
:class:`~blockpilot.runtime.planner.Planner` on the torch backend (answer scaffold built, camera image
preprocessed and driving prompt assembled by the planner, as on the car) -> the prompt prefilled into the
backend's static KV cache -> one bidirectional block-diffusion step over the first answer block through the
backend -> a whole plan with the scaffold decoder, checked against the scaffold-constrained AR baseline (same
answer, fewer forwards). Then the shipped reference model is exported and replayed (:func:`heldout_summary`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_io import atomic_write
from ..runtime.plan_types import DecoderSettings, Observation
from ..runtime.planner import Planner
from ..vla.config import SpecialTokens
from ..vla.loader import load_model, load_tokenizer
from ..vla.modes import AttentionMode
from ..vla.plans import DrivingPlan, DrivingSchema, PlanSchema
from ..vla.prompt import EgoState
from ..vla.reference_model import SHIPPED_MODEL, write_reference_checkpoint
from ..vla.reference_tokenizer import build_reference_tokenizer
from ..vla.scaffold import build_scaffold
from ..vla.schema_io import SCHEMA_PRESETS
from ..vla.tokenizer import Tokenizer

SCHEMAS: dict[str, Callable[[], PlanSchema[Any]]] = SCHEMA_PRESETS  # the --schema presets, action chunks included
PROBABILITY_THRESHOLD = 0.9  # Fast-dLLM v2's default confidence threshold, reported for reference


class StageTimer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.ms[name] = (time.perf_counter() - t0) * 1e3


def road_image(size: int) -> np.ndarray:
    """A plain front-camera stand-in (sky, road, lane marks) until the simulator renders scenes."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[: size // 2] = (135, 180, 230)
    img[size // 2:] = (70, 70, 70)
    rows = np.arange(size // 2, size)
    for lane in (-1.0, 0.0, 1.0):
        cols = (size / 2 + lane * (rows - size / 2) * 1.6).astype(int)
        ok = (cols >= 0) & (cols < size)
        img[rows[ok], cols[ok]] = (240, 240, 240)
    return img


def heldout_summary(scenes: int, out_dir: Path) -> dict[str, object]:
    """The shipped reference model exported to a verified bundle and replayed on the ONNX Runtime
    backend over held-out generated scenes written in the nuScenes format, through the same reader,
    evaluator and report as a real dataroot."""
    from ..eval.nuscenes import NuScenesSource
    from ..eval.replay import evaluate_and_report, run_header
    from ..eval.synthetic import HELDOUT_SEED_BASE
    from ..export.bundle_export import export_bundle
    from ..runtime.bundle_planner import planner_from_bundle
    from ..sim.generator import generate_scene
    from ..sim.writers.nuscenes import write_nuscenes

    bundle_dir = out_dir / "bundle"
    try:  # TensorRT-RTX engines are built ahead of time on this CPU; they run on sm 8.9 GPUs, not here
        export = export_bundle(SHIPPED_MODEL, bundle_dir, overwrite=True, targets=("rtx",))
    except ImportError as exc:  # no TensorRT of any kind installed: the bundle still carries the ONNX graphs
        print(f"engines                skipped: {exc}")
        export = export_bundle(SHIPPED_MODEL, bundle_dir, overwrite=True)
    engines = [f for f in export.files if f.startswith("engines/") and f.endswith(".engine")]
    print(f"exported bundle        {bundle_dir}: {len(export.files)} files, "
          f"{sum(export.files.values()) / 1e6:.1f} MB: ONNX graphs with KV-cache I/O, {len(engines)} TensorRT-RTX "
          f"fp16 engines for sm 8.9 (LM step on TensorRT's attention layer), sha256 manifest")
    dataroot = out_dir / "heldout-nuscenes"
    if dataroot.exists():
        shutil.rmtree(dataroot)
    write_nuscenes([generate_scene(HELDOUT_SEED_BASE + i) for i in range(scenes)], dataroot)
    source = NuScenesSource(dataroot)
    planner = planner_from_bundle(bundle_dir, decoder=DecoderSettings(name="scaffold"))
    run_dir = out_dir / "eval"
    print(f"held-out replay        {scenes} generated scenes written as nuScenes ({dataroot}), {len(source)} "
          f"keyframes, bundle on ONNX Runtime (CPU), scaffold decoder")
    header = {**run_header(source, bundle_dir, planner), "backend": "onnxruntime"}
    evaluate_and_report(planner, source, run_dir, header=header, overwrite=True)
    metrics: dict[str, object] = json.loads((run_dir / "report" / "metrics.json").read_text())
    return metrics


def demo_observation(image_size: int = 112) -> Observation:
    """The demo's observation: :func:`road_image` in front, driving straight at 5 m/s."""
    ego = EgoState(past_waypoints=np.array([[-5.0 + 1.25 * i, 0.0] for i in range(4)]), speed_mps=5.0,
                   accel_mps2=0.0)
    return Observation([road_image(image_size)], ego, "go straight")


def run_demo(out_dir: Path, seed: int = 0, image_size: int = 112, heldout_scenes: int = 10,
             robot_episodes: int = 10) -> dict[str, object]:
    timer = StageTimer()
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer.stage("write_checkpoint"):
        ckpt = write_reference_checkpoint(out_dir / "checkpoint", seed)
    with timer.stage("load_checkpoint"):
        model = load_model(ckpt)
        tokenizer = load_tokenizer(ckpt, model.config)
    with timer.stage("build_planner"):  # the answer scaffold, the backend and its KV cache
        planner = Planner.from_model(model, tokenizer, decoder=DecoderSettings(name="scaffold"))
    scaffold, schema, policy = planner.scaffold, planner.schema, planner.image_policy
    assert isinstance(schema, DrivingSchema) and policy is not None  # the reference model is a driving VLA
    observation = demo_observation(image_size)
    with timer.stage("prompt"):
        prompt, _ = planner.prompt(observation)
    grid = [list(policy.grid(image_size, image_size))]
    block, backend = planner.config.diffusion.block_size, planner.backend
    with timer.stage("prefill"):  # the image encoded and the prompt written into the backend's KV cache
        first = backend.prefill(prompt)
    window = np.array(scaffold.token_ids[:block], dtype=np.int64)[None]  # value slots masked
    with timer.stage("block_step"):  # one bidirectional step over the first answer block, cache left as it was
        step = backend.step(window, len(prompt), mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    # Shifted prediction: the state before a position predicts the token at it.
    top1 = np.concatenate((first.top1[0, -1:], step.top1[0, :-1]))
    probs = np.concatenate((first.prob[0, -1:], step.prob[0, :-1]))
    with timer.stage("plan"):
        plan = planner.plan(observation)
    baseline = Planner.from_model(model, tokenizer, decoder=DecoderSettings(name="ar")).plan(observation)
    same_answer = bool(np.array_equal(plan.tokens, baseline.tokens))
    masked = ~scaffold.frozen[:block]
    example = DrivingPlan(waypoints=np.array([[2.5 * (i + 1), 0.0] for i in range(schema.num_waypoints)]),
                          longitudinal="keep_speed", lateral="straight",
                          critical_objects=dict.fromkeys(schema.critical_object_keys, False),
                          explanation="The road ahead is clear; keep the lane and the current speed.")
    round_trip = scaffold.decode_plan(scaffold.encode_plan(example))
    summary: dict[str, object] = {
        "checkpoint": str(ckpt),
        "prompt_tokens": len(prompt),
        "image_grid_thw": grid,
        "answer_tokens": len(scaffold),
        "value_slots": len(scaffold.slots),
        "frozen_fraction": round(float(scaffold.frozen.mean()), 3),
        "first_block_masked": int(masked.sum()),
        "first_block_above_threshold": int((probs[masked] > PROBABILITY_THRESHOLD).sum()),
        "round_trip_exact": bool(np.array_equal(round_trip.waypoints, example.waypoints)),
        "timings_ms": {k: round(v, 2) for k, v in timer.ms.items()},
        "plan": {**plan.to_dict(), "ar_forwards": baseline.stats.forwards, "same_answer_as_ar": same_answer},
    }
    print(f"reference checkpoint   {ckpt}  (random weights: values decoded below are not a plan yet)")
    print(f"prompt                 {len(prompt)} tokens, image grid {grid[0]}")
    print(f"answer scaffold        {len(scaffold)} tokens, {len(scaffold.slots)} value slots, "
          f"{summary['frozen_fraction']:.0%} frozen")
    print(scaffold.describe())
    print(f"block step             first block of {block}: {int(masked.sum())} masked positions, "
          f"{summary['first_block_above_threshold']} above p={PROBABILITY_THRESHOLD}")
    print("top-1 in masked slots  " + tokenizer.decode(top1[masked].tolist()).replace("\n", " ")[:80])
    print(f"schema round trip      plan -> tokens -> plan exact: {summary['round_trip_exact']}")
    stats = plan.stats
    print(f"plan (scaffold)        {stats.forwards} forwards vs {baseline.stats.forwards} for AR, "
          f"{stats.tokens_per_forward:.2f} tokens/forward, same answer as AR: {same_answer}")
    print("plan stages (ms)       " + ", ".join(f"{k} {v:.1f}" for k, v in stats.stage_ms.items()))
    outcome = "parsed" if plan.ok else f"did not parse ({plan.error})"
    print(f"plan answer            {outcome}: " + plan.text.replace("\n", " ")[:60])
    print("timings (ms)           " + ", ".join(f"{k} {v:.1f}" for k, v in timer.ms.items()))
    if heldout_scenes > 0 and SHIPPED_MODEL.is_dir():
        summary["heldout"] = heldout_summary(heldout_scenes, out_dir)
    if robot_episodes > 0:
        from .robot import robot_available, robot_summary

        missing = robot_available()
        if missing is None:
            summary["robot"] = robot_summary(robot_episodes, out_dir)
        else:
            print(f"robot                  skipped: {missing}")
    atomic_write(out_dir / "demo.json", json.dumps(summary, indent=2) + "\n")
    return summary


def print_scaffold(schema_name: str | PlanSchema[Any], checkpoint: Path | None) -> None:
    """Print a schema's scaffold (a preset name or a compiled schema) for a checkpoint's tokenizer
    (default: the reference tokenizer)."""
    tokenizer: Tokenizer
    if checkpoint is None:
        tokenizer, _ = build_reference_tokenizer()
    else:
        from ..vla.hf_config import load_config

        tokens: SpecialTokens = load_config(checkpoint).tokens
        tokenizer = Tokenizer.from_file(checkpoint, tokens)
    schema = SCHEMAS[schema_name]() if isinstance(schema_name, str) else schema_name
    scaffold = build_scaffold(schema, tokenizer)
    print(scaffold.describe())
    print(f"\n{len(scaffold)} tokens, {len(scaffold.slots)} value slots, {int((~scaffold.frozen).sum())} value "
          f"tokens, sections: " + ", ".join(f"{s.key}[{s.start}:{s.end}]" for s in scaffold.sections))
