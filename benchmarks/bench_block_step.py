"""Forward cost of one block-diffusion step against token-by-token AR steps, on the reference model.

Prints ratios measured in one run (machines are noisy; compare only numbers from the same run):
the wall time of one B-token bidirectional step (write_kv=False) and of B one-token causal steps
over the same cached prompt. Usage: ``.venv/bin/python benchmarks/bench_block_step.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.reference_model import build_reference_model


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", type=int, default=256, help="cached prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _ = build_reference_model()
    block = model.config.diffusion.block_size
    vocab = model.config.lm.vocab_size
    cache = model.new_cache(args.prompt + block)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    window = torch.randint(0, vocab, (1, block), generator=g)
    with torch.inference_mode():
        model(prompt, cache=cache)

        def block_step() -> None:
            h = model(window, cache=cache, start=args.prompt, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
            model.logits(h).max(-1)

        def ar_steps() -> None:
            for i in range(block):
                h = model(window[:, i: i + 1], cache=cache, start=args.prompt + i, mode=AttentionMode.CAUSAL)
                model.logits(h).max(-1)

        t_block = _best_ms(block_step, args.repeats)
        t_ar = _best_ms(ar_steps, args.repeats)
    print(f"reference model, CPU, {torch.get_num_threads()} threads, prompt {args.prompt}, block {block}")
    print(f"one {block}-token block step        {t_block:8.2f} ms")
    print(f"{block} one-token AR steps          {t_ar:8.2f} ms")
    print(f"ratio AR / block (same {block} positions)  {t_ar / t_block:6.1f}x")


if __name__ == "__main__":
    main()
