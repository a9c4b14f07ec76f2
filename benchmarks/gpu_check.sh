#!/usr/bin/env bash
# FreeKV GPU check for a bare GPU machine (torch + triton only, no sglang), run from the
# repo root: kernel + core tests on CUDA, then the recall and select benchmarks on cuda.
# Logs and JSON land in $OUT (default benchmarks/results/gpu). Total budget < 8 minutes
# (tests 270 s + two benchmarks 90 s each + start-up; GPU_CHECK_PYTEST_S and GPU_CHECK_BENCH_S
# shorten them, GPU_CHECK_BENCH_ARGS=--quick shrinks the benchmarks); each step has its own
# timeout and a failing step does not stop the next. Without a CUDA device it stops after the environment
# step with exit status 3 (GPU_CHECK_ALLOW_CPU=1 runs the same steps on CPU, slowly).
# The SGLang serving check is benchmarks/gpu_serve_check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
status=0
PYTEST_S=${GPU_CHECK_PYTEST_S:-270}
BENCH_S=${GPU_CHECK_BENCH_S:-90}

echo "== environment" | tee "$OUT/env.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1 | tee -a "$OUT/env.log"
(nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>&1 || true) | tee -a "$OUT/env.log"
DEV=cuda
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
if ! $PY -c "import torch, triton" >/dev/null 2>&1; then
  echo "gpu_check.sh: $PY cannot import torch and triton; nothing was run (set PYTHON)." | tee -a "$OUT/env.log"
  exit 3
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False);" \
      "nothing was run. This check needs a GPU; GPU_CHECK_ALLOW_CPU=1 runs it on CPU." | tee -a "$OUT/env.log"
    exit 3
  fi
  echo "gpu_check.sh: no CUDA device; GPU_CHECK_ALLOW_CPU=1: tests in the interpreter, quick benchmarks on CPU" | tee -a "$OUT/env.log"
  DEV=cpu
  BENCH_ARGS+=(--quick)
fi

echo "== tests (tests/kernels tests/core)"
if $PY -c "import pytest" >/dev/null 2>&1; then
  # The tests need neither sglang nor pytest plugins.
  if ! timeout -k 10 "$PYTEST_S" $PY -m pytest tests/kernels tests/core -q -p no:cacheprovider -rs \
      2>&1 | tee "$OUT/pytest.log"; then
    echo "pytest FAILED (see $OUT/pytest.log)" | tee -a "$OUT/pytest.log"
    status=1
  fi
else
  echo "pytest is missing on this machine; skipping tests" | tee "$OUT/pytest.log"
fi

echo "== bench_recall ($DEV)"
if ! timeout -k 5 "$BENCH_S" $PY benchmarks/bench_recall.py --device $DEV ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$OUT/bench_recall.log"; then
  echo "bench_recall FAILED" | tee -a "$OUT/bench_recall.log"
  status=1
fi

echo "== bench_select ($DEV)"
if [ -f benchmarks/bench_select.py ]; then
  args=()
  if $PY benchmarks/bench_select.py --help 2>/dev/null | grep -q -- "--device"; then
    args=(--device $DEV)
  fi
  args+=(${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"})
  if ! timeout -k 5 "$BENCH_S" $PY benchmarks/bench_select.py ${args[@]+"${args[@]}"} 2>&1 | tee "$OUT/bench_select.log"; then
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
