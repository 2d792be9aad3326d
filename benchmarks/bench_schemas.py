"""Scaffold speculative decoding vs scaffold-constrained AR across answer schemas, in one run.

Schemas: the checkpoint's driving layout (nuScenes), the WOD-E2E layout with the same explanation
budget, the robot preset, and the JSON Schema
documents in ``benchmarks/schemas/`` (a pick-and-place action chunk, a detection list of enums,
booleans and boxes, a status report with free text), each compiled by
:func:`blockpilot.vla.json_schema.compile_schema`. Every schema decodes the same prompt (a
held-out generated driving scene) on the shipped reference model with both decoders.

Columns: ``len`` scaffold tokens, ``slots`` value tokens (what a decoder must choose), NFE
(backend calls, prefill included) and tokens per decode forward (answer tokens / non-prefill
forwards, as the demo reports it) for ``ar`` and ``scaffold``, the NFE ratio ar/scaffold, ``NFE ff``:
the forwards AR would need if it fed each run of forced structure tokens in with the value token
before it (the "fast-forward" of structured-generation libraries), counted from the scaffold, not
run: one forward per value token, the first coming from the prefill; the
best-of-``--repeats`` decode wall time of each and its ratio, whether the two answers are
identical token for token (they must be: the scaffold decoder is lossless), and whether the
answer parses. The reference model was trained on the driving layout only, so on the other
schemas its values are untrained guesses: their forward counts show how the decoder copes with
a structure the model does not know, and a value of the wrong type fails the parse (typed-slot
constraints, issue 15 item 4, address that).

Usage: ``.venv/bin/python benchmarks/bench_schemas.py [--checkpoint models/reference] [--repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.runtime.decoders import ar_greedy, scaffold_speculative
from blockpilot.runtime.decoders.common import Decoded
from blockpilot.runtime.decoders.speculative import SpeculativeOptions
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.answer_parser import PlanParseError
from blockpilot.vla.json_schema import load_json_schema
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.plans import ActionChunkSchema, DrivingSchema, PlanSchema, RobotActionSchema
from blockpilot.vla.scaffold import build_scaffold
from blockpilot.vla.schema_io import load_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def schemas(checkpoint: str) -> list[tuple[str, PlanSchema[Any]]]:
    """The checkpoint's own layout (nuScenes driving with its trained explanation budget), the same
    budget in the WOD-E2E layout, the robot preset, the two action-chunk presets, then the JSON Schema documents."""
    trained = load_schema(checkpoint)
    assert isinstance(trained, DrivingSchema)
    out: list[tuple[str, PlanSchema[Any]]] = [
        ("driving nuScenes", trained),
        ("driving WOD-E2E", replace(DrivingSchema.wod_e2e(), explanation_tokens=trained.explanation_tokens)),
        ("robot action", RobotActionSchema()),
        ("so101-joints", ActionChunkSchema.so101_joints()),
        ("ee-delta", ActionChunkSchema.ee_delta()),
    ]
    out += [(path.stem, load_json_schema(path)) for path in sorted(SCHEMA_DIR.glob("*.json"))]
    return out


def _timed(run: Any, repeats: int) -> tuple[Decoded, float]:
    decoded = run()  # warm-up; counts are deterministic
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return decoded, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "reference"))
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per decoder (best is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--only", default="", help="run only the schemas whose name contains this text")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint, model.config)
    tokens = model.config.tokens
    block = DecoderSettings(name="scaffold").filled(model.config.diffusion, 1).block_size
    assert block is not None
    # The driving prompt of a held-out generated scene, for every schema.
    planner = Planner.from_model(model, tokenizer, schema=load_schema(args.checkpoint))
    prompt, _ = planner.prompt(observation(heldout_keyframes(1, stride=8)[1]))
    options = SpeculativeOptions(mask_id=tokens.mask, block_size=block, threshold=0.0)

    print(f"{args.checkpoint}; cpu, {torch.get_num_threads()} threads; prompt {len(prompt)} tokens; "
          f"block {block}; best of {args.repeats}")
    print(f"{'schema':<18}{'len':>5}{'slots':>6}{'NFE ar':>8}{'NFE sc':>8}{'tok/fw ar':>10}{'tok/fw sc':>10}"
          f"{'NFE ar/sc':>10}{'NFE ff':>8}{'ff/sc':>7}{'ms ar':>8}{'ms sc':>8}{'ms ar/sc':>9}  same  parsed")
    for name, schema in schemas(args.checkpoint):
        if args.only not in name:
            continue
        scaffold = build_scaffold(schema, tokenizer)
        backend = TorchBackend(model, len(prompt) + len(scaffold) + block + 1)

        def run_ar(scaffold: Any = scaffold, backend: TorchBackend = backend) -> Decoded:
            return ar_greedy(backend, prompt, max_new_tokens=len(scaffold), end_id=tokens.end, scaffold=scaffold)

        def run_sc(scaffold: Any = scaffold, backend: TorchBackend = backend) -> Decoded:
            return scaffold_speculative(backend, prompt, scaffold, options)

        ar, ar_ms = _timed(run_ar, args.repeats)
        sc, sc_ms = _timed(run_sc, args.repeats)
        same = ar.tokens.tolist() == sc.tokens.tolist()
        try:
            scaffold.decode_plan(sc.tokens[0])
            parsed = "yes"
        except PlanParseError as exc:
            parsed = f"no ({exc.field})"
        slots = int((~scaffold.frozen).sum())
        print(f"{name:<18}{len(scaffold):>5}{slots:>6}{ar.forwards:>8}{sc.forwards:>8}{ar.tokens_per_forward:>10.2f}"
              f"{sc.tokens_per_forward:>10.2f}{ar.forwards / sc.forwards:>10.2f}{slots:>8}{slots / sc.forwards:>7.2f}"
              f"{ar_ms:>8.0f}{sc_ms:>8.0f}"
              f"{ar_ms / sc_ms:>9.2f}  {'yes' if same else 'NO':<4}  {parsed}")


if __name__ == "__main__":
    main()
