#!/usr/bin/env bash
# FreeKV GPU check for a bare GPU machine (torch + triton only, no sglang), run from the
# repo root: kernel + core tests, then the recall and select benchmarks on cuda.
# Logs and JSON land in $OUT (default benchmarks/results/gpu). Total budget < 8 minutes.
set -euo pipefail
OUT=${OUT:-benchmarks/results/gpu}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python}
status=0

echo "== environment" | tee "$OUT/env.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1 | tee -a "$OUT/env.log"
(nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>&1 || true) | tee -a "$OUT/env.log"

echo "== tests (tests/kernels tests/core)"
if $PY -c "import pytest" >/dev/null 2>&1; then
  # The tests need neither sglang nor pytest plugins.
  if ! timeout 270 $PY -m pytest tests/kernels tests/core -q -p no:cacheprovider -rs \
      2>&1 | tee "$OUT/pytest.log"; then
    echo "pytest FAILED (see $OUT/pytest.log)" | tee -a "$OUT/pytest.log"
    status=1
  fi
else
  echo "pytest is missing on this machine; skipping tests" | tee "$OUT/pytest.log"
fi

echo "== bench_recall (cuda)"
if ! timeout 90 $PY benchmarks/bench_recall.py --device cuda 2>&1 | tee "$OUT/bench_recall.log"; then
  echo "bench_recall FAILED" | tee -a "$OUT/bench_recall.log"
  status=1
fi

echo "== bench_select (cuda)"
if [ -f benchmarks/bench_select.py ]; then
  args=()
  if $PY benchmarks/bench_select.py --help 2>/dev/null | grep -q -- "--device"; then
    args=(--device cuda)
  fi
  if ! timeout 90 $PY benchmarks/bench_select.py ${args[@]+"${args[@]}"} 2>&1 | tee "$OUT/bench_select.log"; then
    echo "bench_select FAILED" | tee -a "$OUT/bench_select.log"
    status=1
  fi
else
  echo "benchmarks/bench_select.py not found; skipped" | tee "$OUT/bench_select.log"
fi

echo "== bench_gpu_step (FreeKV decode step, Llama-3.1-8B shapes, CUDA graph)"
# Last, with what is left of 470 s since this script started (bash SECONDS), so the whole
# check stays under 8 minutes; configurations that no longer fit are skipped and listed in
# its JSON, which is rewritten after each one. Output: $OUT/bench_gpu_step_cuda.json (+ .png
# only while $OUT holds fewer than 7 files: the device tool returns at most 8). For a full run
# alone: python3 benchmarks/bench_gpu_step.py --time-budget 480 (CPU dry run: --tiny).
left=$((470 - SECONDS))
if [ "${DEV:-cuda}" != cuda ]; then
  echo "bench_gpu_step: needs CUDA; skipped (CPU dry run: $PY benchmarks/bench_gpu_step.py --tiny)"
elif [ "$left" -lt 90 ]; then
  echo "bench_gpu_step: skipped, only ${left}s left of the 8-minute budget" \
    "(run it alone: $PY benchmarks/bench_gpu_step.py --time-budget 480)"
else
  step_args=(--time-budget $((left - 30)))
  if [ "$(find "$OUT" -maxdepth 2 -type f | wc -l)" -ge 7 ]; then
    step_args+=(--no-png)
  fi
  if ! timeout -k 10 $((left - 15)) $PY benchmarks/bench_gpu_step.py "${step_args[@]}"; then
    echo "bench_gpu_step FAILED or cut short (what it measured: $OUT/bench_gpu_step_cuda.json)"
    status=1
  fi
fi

echo "== done (status $status); logs in $OUT"
exit $status
