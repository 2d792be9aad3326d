"""The block-attention kernel unsplit against split-KV at the Fast-dDrive 3B shape, in one run (needs a CUDA GPU).

16 query heads, 2 K/V heads, head_dim 128, bf16; a 32-token bidirectional block step and a one-token causal AR step
at the end of a cache of each ``--caches`` length. Each launch is timed in CUDA-graph replays (what the backend
runs; the workspace allocated once, before the capture) at 1 split and at :func:`default_num_splits`; the ratio is
``unsplit / split`` (above 1: split-KV is faster). Compare numbers from the same run only.

Usage: ``.venv/bin/python benchmarks/bench_attention_splits.py [--caches 1024,4096]``
"""

from __future__ import annotations

import argparse
import functools

import torch
from triton.testing import do_bench_cudagraph

from blockpilot.kernels.block_attention import attention_workspace, block_diffusion_attention, default_num_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--caches", default="1024,4096", help="comma-separated KV cache lengths")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, 16/2 heads, head_dim 128, bf16; ms per launch (graph replay)")
    for cache in (int(c) for c in args.caches.split(",")):
        k, v = (torch.randn(1, 2, cache, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        for t, mode in ((32, 2), (1, 0)):
            q = torch.randn(1, 16, t, 128, device=device, dtype=torch.bfloat16)
            out = torch.empty_like(q)
            scalars = torch.tensor([cache - t, cache, mode], dtype=torch.int32, device=device)
            splits = default_num_splits(16, 2, t, cache, device)
            workspace = attention_workspace(16, t, 128, splits, device) if splits > 1 else None
            launch = functools.partial(block_diffusion_attention, q, k, v, scalars[0:1], scalars[1:2], scalars[2:3],
                                       32, 128 ** -0.5, out=out)
            ms = {n: do_bench_cudagraph(functools.partial(launch, num_splits=n, workspace=workspace if n > 1 else None))
                  for n in (1, splits)}
            print(f"cache {cache:6d}  T {t:3d}  1 split {ms[1]:.4f}  {splits} splits {ms[splits]:.4f}  "
                  f"ratio {ms[1] / ms[splits]:.2f}x")


if __name__ == "__main__":
    main()
