"""The GPU fast path against the memory roofline, ``transformers`` and the eager torch backend, in one run.

Runs what ``blockpilot bench`` runs (:mod:`blockpilot.bench`): per model (reference, 1.5b, 3b) and dtype (bf16,
fp8), ms per block-step forward (32 tokens vs a 1,024-token KV cache) beside the roofline (bytes of weights + KV
read over the device-to-device copy bandwidth measured in the same run), the AR step beside ``transformers``
``generate`` on a Qwen2-shaped random model of the same shape, and ms per plan per decoder on the reference model.
On a CPU it runs the CPU rows (torch and ONNX Runtime, 1 and 2 threads; large shapes only with --allow-slow).

Usage: ``.venv/bin/python benchmarks/bench_gpu.py [--models reference,1.5b,3b] [--dtypes bf16,fp8]
[--device auto] [--out runs/bench/bench.json]`` (every option of ``blockpilot bench --help``).
"""

from __future__ import annotations

import sys

from blockpilot.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
