"""``blockpilot demo``: the end-to-end CPU path as far as the project reaches today.

Reference checkpoint written in the HF layout -> loaded back through the real loader -> camera
image preprocessed -> driving prompt assembled -> answer scaffold built -> prompt prefilled into
the static KV cache -> one bidirectional block-diffusion step over the first answer block -> a
whole plan through the :class:`~blockpilot.runtime.planner.Planner` with the scaffold decoder,
checked against the scaffold-constrained AR baseline (same answer, fewer forwards).
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
import torch

from .atomic_io import atomic_write
from .runtime.plan_types import DecoderSettings, Observation
from .runtime.planner import Planner
from .vla.config import SpecialTokens
from .vla.image import preprocess_image
from .vla.loader import load_model, load_tokenizer
from .vla.modes import AttentionMode
from .vla.plans import DrivingPlan, DrivingSchema, PlanSchema, RobotActionSchema
from .vla.prompt import DRIVING_SYSTEM_PROMPT, EgoState, chat_prompt_ids, driving_instruction
from .vla.reference_model import write_reference_checkpoint
from .vla.reference_tokenizer import build_reference_tokenizer
from .vla.rope_index import continuation_positions, image_token_counts
from .vla.scaffold import build_scaffold
from .vla.tokenizer import Tokenizer

SCHEMAS: dict[str, Callable[[], PlanSchema[Any]]] = {
    "driving-nuscenes": DrivingSchema.nuscenes, "driving-wod": DrivingSchema.wod_e2e, "robot": RobotActionSchema,
}
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


SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "reference"


def heldout_summary(scenes: int, out_dir: Path) -> dict[str, object]:
    """The shipped reference model exported to a verified bundle and replayed on the ONNX Runtime
    backend over held-out generated scenes written in the nuScenes format, through the same reader,
    evaluator and report as a real dataroot."""
    from .eval.nuscenes import NuScenesSource
    from .eval.replay import evaluate_and_report, run_header
    from .eval.synthetic import HELDOUT_SEED_BASE
    from .export.bundle_export import export_bundle
    from .runtime.bundle_planner import planner_from_bundle
    from .sim.generator import generate_scene
    from .sim.writers.nuscenes import write_nuscenes

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


def run_demo(out_dir: Path, seed: int = 0, image_size: int = 112, heldout_scenes: int = 10) -> dict[str, object]:
    timer = StageTimer()
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer.stage("write_checkpoint"):
        ckpt = write_reference_checkpoint(out_dir / "checkpoint", seed)
    with timer.stage("load_checkpoint"):
        model = load_model(ckpt)
        tokenizer = load_tokenizer(ckpt, model.config)
    config = model.config
    assert config.vision is not None  # the reference model is a VLA
    schema = DrivingSchema.nuscenes()
    with timer.stage("build_scaffold"):
        scaffold = build_scaffold(schema, tokenizer)
    image = road_image(image_size)
    with timer.stage("preprocess_image"):
        patches, grid = preprocess_image(image, config.vision)
    ego = EgoState(past_waypoints=np.array([[-5.0 + 1.25 * i, 0.0] for i in range(4)]), speed_mps=5.0,
                   accel_mps2=0.0)
    instruction = driving_instruction(ego, "go straight")
    prompt = chat_prompt_ids(tokenizer, DRIVING_SYSTEM_PROMPT, instruction,
                             image_token_counts(grid, config.vision.spatial_merge_size))
    block = config.diffusion.block_size
    ids = torch.tensor([prompt])
    cache = model.new_cache(capacity=len(prompt) + len(scaffold) + block)
    with torch.inference_mode():
        with timer.stage("prefill"):
            _, deltas = model.rope_index(ids, grid)
            hidden = model(ids, pixel_values=patches, grid_thw=grid, cache=cache, mode=AttentionMode.CAUSAL)
        window = torch.from_numpy(scaffold.token_ids[:block].copy())[None]
        with timer.stage("block_step"):
            step = model(window, position_ids=continuation_positions(len(prompt), block, deltas), cache=cache,
                         start=len(prompt), mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
            # Shifted prediction: the state before a position predicts the token at it.
            logits = model.logits(torch.cat((hidden[:, -1:], step[:, :-1]), dim=1))[0]
            probs, top1 = logits.softmax(-1).max(-1)
    observation = Observation([image], ego, "go straight")
    with timer.stage("plan"):
        plan = Planner.from_model(model, tokenizer, decoder=DecoderSettings(name="scaffold")).plan(observation)
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
        "image_grid_thw": grid.tolist(),
        "answer_tokens": len(scaffold),
        "value_slots": len(scaffold.slots),
        "frozen_fraction": round(float(scaffold.frozen.mean()), 3),
        "first_block_masked": int(masked.sum()),
        "first_block_above_threshold": int((probs.numpy()[masked] > PROBABILITY_THRESHOLD).sum()),
        "round_trip_exact": bool(np.array_equal(round_trip.waypoints, example.waypoints)),
        "timings_ms": {k: round(v, 2) for k, v in timer.ms.items()},
        "plan": {**plan.to_dict(), "ar_forwards": baseline.stats.forwards, "same_answer_as_ar": same_answer},
    }
    print(f"reference checkpoint   {ckpt}  (random weights: values decoded below are not a plan yet)")
    print(f"prompt                 {len(prompt)} tokens, image grid {grid.tolist()[0]}")
    print(f"answer scaffold        {len(scaffold)} tokens, {len(scaffold.slots)} value slots, "
          f"{summary['frozen_fraction']:.0%} frozen")
    print(scaffold.describe())
    print(f"block step             first block of {block}: {int(masked.sum())} masked positions, "
          f"{summary['first_block_above_threshold']} above p={PROBABILITY_THRESHOLD}")
    print("top-1 in masked slots  " + tokenizer.decode(top1.numpy()[masked].tolist()).replace("\n", " ")[:80])
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
    atomic_write(out_dir / "demo.json", json.dumps(summary, indent=2) + "\n")
    return summary


def print_scaffold(schema_name: str | PlanSchema[Any], checkpoint: Path | None) -> None:
    """Print a schema's scaffold (a preset name or a compiled schema) for a checkpoint's tokenizer
    (default: the reference tokenizer)."""
    tokenizer: Tokenizer
    if checkpoint is None:
        tokenizer, _ = build_reference_tokenizer()
    else:
        from .vla.hf_config import load_config

        tokens: SpecialTokens = load_config(checkpoint).tokens
        tokenizer = Tokenizer.from_file(checkpoint, tokens)
    schema = SCHEMAS[schema_name]() if isinstance(schema_name, str) else schema_name
    scaffold = build_scaffold(schema, tokenizer)
    print(scaffold.describe())
    print(f"\n{len(scaffold)} tokens, {len(scaffold.slots)} value slots, {int((~scaffold.frozen).sum())} value "
          f"tokens, sections: " + ", ".join(f"{s.key}[{s.start}:{s.end}]" for s in scaffold.sections))
