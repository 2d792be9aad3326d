"""Where a block step's and the vision tower's GPU time goes: the top kernels of one forward, by CUDA time.

Runs the CUDA backend eagerly (graphs off, so every launch is visible; the kernels are the ones a graph replays)
on a random model of ``--model``'s shape, one ``--tokens``-token bidirectional draft over a ``--kv``-token cache,
then one forward of that shape's vision tower on an ``--image`` camera image, each under ``torch.profiler``.
Prints kernel counts and the top ``--top`` kernels per forward. Needs a CUDA GPU.

Usage: ``python benchmarks/profile_kernels.py [--model 3b] [--dtype bf16] [--tokens 32] [--kv 1024]``
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from blockpilot.bench.estimate import VISION_SHAPES, image_grid, random_vision
from blockpilot.bench.models import DTYPES, random_model
from blockpilot.runtime.backend import Prompt
from blockpilot.runtime.cuda_backend import CudaBackend
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.vision import vision_layout


def _report(title: str, prof: profile, top: int) -> None:
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"\n{title}: {launches} kernel launches, {total / 1e3:.3f} ms of kernel time")
    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]:
        print(f"  {e.self_device_time_total / 1e3:8.3f} ms  {e.count:5d}x  {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="3b", choices=["1.5b", "3b"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--kv", type=int, default=1024)
    parser.add_argument("--image", default="504x896")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--fp8-per-channel", action="store_true", help="per-channel fp8 weight scales (as the bench)")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_model(args.model, args.dtype, device)
    backend = CudaBackend(model, args.kv + args.tokens + 64, precision=args.dtype, graphs=False,
                          fp8_per_channel=args.fp8_per_channel)
    ids = torch.randint(16, 1000, (args.kv + args.tokens,)).numpy()
    backend.prefill(Prompt(ids[: args.kv]))
    window = ids[None, args.kv:]
    for _ in range(3):
        backend.step(window, args.kv, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        backend.step(window, args.kv, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
        torch.cuda.synchronize()
    _report(f"{args.model} {args.dtype} block step ({args.tokens} tokens, {args.kv}-token cache, eager)", prof,
            args.top)
    del backend, model
    if args.model in VISION_SHAPES:
        tower = random_vision(args.model, args.dtype, device)
        height, width = (int(v) for v in args.image.split("x"))
        rows, cols = image_grid(height, width, tower.config)
        grid = torch.tensor([[1, rows, cols]])
        layout = vision_layout(grid, tower.config)
        c = tower.config
        width_px = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
        patches = torch.randn(rows * cols, width_px, device=device, dtype=DTYPES[args.dtype])
        with torch.inference_mode():
            for _ in range(2):
                tower(patches, grid, layout)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                tower(patches, grid, layout)
                torch.cuda.synchronize()
        _report(f"{args.model} vision tower ({args.image}, {rows * cols} patches)", prof, args.top)


if __name__ == "__main__":
    main()
