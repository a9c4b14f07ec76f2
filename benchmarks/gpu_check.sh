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

echo "== done (status $status); logs in $OUT"
exit $status
