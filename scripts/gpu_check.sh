#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU and the project's Python deps (torch, triton,
# transformers, onnx, onnxruntime, pytest): the `gpu` tests, the split-KV kernel bench, a kernel profile, the
# prefix-reuse bench and `blockpilot bench`.
# Every step has its own time limit and writes its log under $OUT (default runs/gpu), so one failing or slow step
# still leaves the others' results. Usage: bash scripts/gpu_check.sh   (PYTHON, TESTS_S, BENCH_S, MODELS, DTYPES)
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} 2>&1 | tee "$out/env.txt"

per_test=$($py -c "import pytest_timeout" 2>/dev/null && echo --timeout=150)  # where pytest-timeout is installed
# the NVFP4 emulation check needs modelopt (carry its wheels to a machine without it)
quant=$($py -c "import modelopt.torch.quantization" 2>/dev/null && echo tests/test_quant_apply.py)
timeout "${TESTS_S:-180}" $py -m pytest -m gpu -q -p no:cacheprovider $per_test \
  --junitxml="$out/gpu_tests.xml" tests/test_kernel_block_attention.py tests/test_kernel_split_kv.py \
  tests/test_kernel_fused.py tests/test_fp8_quant.py \
  tests/test_cuda_backend.py tests/test_export_plugin.py tests/test_runtime_trt.py $quant 2>&1 \
  | tee "$out/gpu_tests.log"

timeout "${SPLITS_S:-60}" $py benchmarks/bench_attention_splits.py 2>&1 | tee "$out/splits.log"
for dtype in bf16 fp8; do
  timeout "${PROFILE_S:-45}" $py benchmarks/profile_kernels.py --dtype $dtype 2>&1
done | tee "$out/profile.log"

timeout "${REUSE_S:-60}" $py benchmarks/bench_prefix_reuse.py --device cuda --observations 4 2>&1 | tee "$out/reuse.log"

timeout "${BENCH_S:-300}" $py benchmarks/bench_gpu.py --models "${MODELS:-reference,1.5b,3b}" \
  --dtypes "${DTYPES:-bf16,fp8}" --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
