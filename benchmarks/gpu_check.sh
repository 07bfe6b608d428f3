#!/usr/bin/env bash
# The GPU check, one run of under 8 minutes on a single H100/H200 (needs `pip install -e ".[dev,kernels]"`):
#   1. the kernel tests compiled on CUDA (tests/test_kernels.py, one config per kernel, no autotuning),
#   2. the card's copy bandwidth and bf16 matmul rate, then the GQA vs MHA attention benchmark
#      (Triton vs SDPA flash/efficient vs repeat_kv, at Qwen2-0.5B/7B/72B shapes) with autotuning,
#   3. RMSNorm / RoPE / SwiGLU timings against their references.
# Tables go to stdout and to OUT/*.txt; raw numbers to OUT/attention.json, OUT/kernels.json; a plot to
# OUT/attention.png. Copy the figures into benchmarks/RESULTS.md with the card, the date and this command.
#   bash benchmarks/gpu_check.sh [OUT]        (default OUT: benchmarks/gpu_out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu.txt"
echo "== 1. kernel tests on CUDA"
QWEN2_PURE_AUTOTUNE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 \
  | tee "$OUT/tests.txt" || echo "kernel tests FAILED (see $OUT/tests.txt)"
echo "== 2. ceilings and the GQA vs MHA attention benchmark"
timeout 240 python3 benchmarks/attention.py --out "$OUT" 2>&1 | tee "$OUT/attention.txt"
echo "== 3. RMSNorm, RoPE, SwiGLU"
timeout 60 python3 benchmarks/kernels_timing.py "$OUT" 2>&1 | tee "$OUT/kernels.txt"
echo "== 4. the whole model: end to end, parity, decode kernel at 7B/72B, LoRA (benchmarks/gpu_e2e.py)"
timeout 480 python3 benchmarks/gpu_e2e.py --out "$OUT" --budget-s 450 2>&1 | tee "$OUT/gpu_e2e.txt" \
  || echo "gpu_e2e FAILED (see $OUT/gpu_e2e.txt)"
