"""The block decoder's sub-block cache rules against each other and against no cache, on held-out scenes.

For every held-out keyframe the ``block`` decoder plans through the Planner (camera image, driving
prompt) with the sub-block cache off, with the ``published`` rule (Fast-dLLM v2's ``generate``) and
with the ``window`` rule. Reported per configuration: forwards (NFE, prefill included), decode
forwards, answer tokens per decode forward, tokens forwarded per plan after the prefill (the sum
of every decoding forward's width: what the device computes), ms per plan (median) and the parse
rate; then how often the answers of two configurations differ. Last, the oracle written from the published rules
(``blockpilot.runtime.published_generate``) on the same prompts: that it equals the ``published``
rule, and how often the published code's stale block cache changes the answer.

Usage: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_sub_block_rule.py [--checkpoint models/reference]
[--scenes 4] [--threshold 0.9] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.runtime.backend import Prompt, StepResult, TokenArray
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.runtime.published_generate import published_generate
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.schema_io import load_schema

ROOT = Path(__file__).resolve().parents[1]


class WidthCounter:
    """Wraps a backend and sums the tokens every decoding forward runs (the prefill left out)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        return self.inner.prefill(prompt, length=length, mode=mode)  # type: ignore[no-any-return]

    def step(self, tokens: TokenArray, start: int, **kwargs: Any) -> StepResult:
        self.tokens += int(np.asarray(tokens).size)
        return self.inner.step(tokens, start, **kwargs)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "reference"))
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes (every 4th keyframe of each)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint, model.config)
    schema = load_schema(checkpoint)
    frames = heldout_keyframes(args.scenes)
    configs = {"no cache": DecoderSettings(name="block", threshold=args.threshold),
               "published": DecoderSettings(name="block", threshold=args.threshold, sub_block_cache=True),
               "window": DecoderSettings(name="block", threshold=args.threshold, sub_block_cache=True,
                                         sub_block_rule="window")}
    answers: dict[str, list[list[int]]] = {}
    print(f"{checkpoint.name}; {len(frames)} held-out keyframes; threshold {args.threshold}; "
          f"cpu, {torch.get_num_threads()} thread(s)")
    print(f"{'rule':<11}{'NFE':>7}{'decode':>8}{'tok/fw':>8}{'fw tokens':>11}{'ms/plan':>9}{'parsed':>8}")
    for label, settings in configs.items():
        planner = Planner.from_model(model, tokenizer, decoder=settings, schema=schema)
        counter = WidthCounter(planner.backend)
        planner.backend = counter  # type: ignore[assignment]
        planner.plan(observation(frames[0]))  # warm-up
        nfe, dec, tpf, widths, ms, ok, rows = [], [], [], [], [], 0, []
        for frame in frames:
            counter.tokens = 0
            t0 = time.perf_counter()
            plan = planner.plan(observation(frame))
            ms.append((time.perf_counter() - t0) * 1e3)
            s = plan.stats
            nfe.append(s.forwards)
            dec.append(s.decode_forwards)
            tpf.append(s.tokens / max(s.decode_forwards, 1))
            widths.append(counter.tokens)
            ok += plan.ok
            rows.append(plan.tokens[0].tolist())
        answers[label] = rows
        print(f"{label:<11}{np.mean(nfe):>7.1f}{np.mean(dec):>8.1f}{np.sum([len(r) for r in rows]) / np.sum(dec):>8.2f}"
              f"{np.mean(widths):>11.0f}{statistics.median(ms):>9.1f}{ok / len(frames):>8.1%}")
    for a, b in (("published", "window"), ("published", "no cache"), ("window", "no cache")):
        same = sum(x == y for x, y in zip(answers[a], answers[b], strict=True))
        print(f"answers {a} vs {b}: {len(frames) - same}/{len(frames)} differ")
    # The oracle written from the published rules, on the same prompts: with the block's own KV it must
    # give the runtime's "published" answers; with the published code's stale block cache, how many change.
    reader = Planner.from_model(model, tokenizer, decoder=configs["published"], schema=schema)
    assert reader.settings.max_new_tokens is not None
    same, changed, parsed = 0, 0, {"fresh": 0, "stale": 0}
    for frame, answer in zip(frames, answers["published"], strict=True):
        prompt, _ = reader.prompt(observation(frame))
        kwargs: dict[str, Any] = dict(mask_id=tokenizer.special.mask, end_id=tokenizer.special.end,
                                      block_size=model.config.diffusion.block_size,
                                      sub_block_size=model.config.diffusion.sub_block_size, threshold=args.threshold,
                                      max_new_tokens=reader.settings.max_new_tokens, use_block_cache=True,
                                      images=prompt.images)
        fresh = published_generate(model, prompt.token_ids.tolist(), **kwargs)
        stale = published_generate(model, prompt.token_ids.tolist(), stale_block_cache=True, **kwargs)
        same += fresh.tokens == answer
        changed += fresh.tokens != stale.tokens
        for key, run in (("fresh", fresh), ("stale", stale)):
            parsed[key] += reader.read_answer(run.tokens)[0] is not None
    n = len(frames)
    print(f"oracle (published rules, the block's own KV) equals the runtime's published rule: {same}/{n}")
    print(f"the published code's stale block cache changes {changed}/{n} answers; parsed {parsed['stale']}/{n} "
          f"(the block's own KV: {parsed['fresh']}/{n})")


if __name__ == "__main__":
    main()
