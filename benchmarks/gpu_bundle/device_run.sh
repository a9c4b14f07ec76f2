#!/usr/bin/env bash
# Both GPU checks in one device `run` call, within one budget, returning at most 8 files.
#
#   bash benchmarks/gpu_bundle/device_run.sh            # OUT is set by the device tool
#
# 1. benchmarks/gpu_check.sh (kernel + core tests on CUDA, recall/select benchmarks), with
#    shortened timeouts (GPU_CHECK_PYTEST_S=150, GPU_CHECK_BENCH_S=45, --quick benchmarks);
# 2. benchmarks/gpu_serve_check.sh with the rest of DEVICE_RUN_BUDGET_S (default 570 s:
#    the command limit is 600 s), without the optional runs unless time is left;
# then $OUT holds: serve_summary.json, serve_check.log, gpu_check_pytest.log,
# gpu_check_env.log, serve_logs.tgz (server + preflight logs), gpu_check.tgz (everything
# gpu_check.sh wrote: logs, benchmark JSON/PNG). Six files, two folders at most.
set -uo pipefail
T0=$(date +%s)
BUDGET=${DEVICE_RUN_BUDGET_S:-570}
cd "$(dirname "$0")/../.."
: "${OUT:?OUT must be set (the device tool sets it)}"
G=/tmp/freekv_gpu_check S=/tmp/freekv_serve_check
rm -rf "$G" "$S"
mkdir -p "$G" "$S" "$OUT"

echo "== gpu_check.sh"
OUT=$G GPU_CHECK_PYTEST_S=${GPU_CHECK_PYTEST_S:-150} GPU_CHECK_BENCH_S=${GPU_CHECK_BENCH_S:-45} \
  GPU_CHECK_BENCH_ARGS=${GPU_CHECK_BENCH_ARGS---quick} bash benchmarks/gpu_check.sh
gc=$?

LEFT=$(( BUDGET - ($(date +%s) - T0) - 15 ))
echo "== gpu_serve_check.sh ($LEFT s)"
OUT=$S GPU_SERVE_CHECK_BUDGET_S=$LEFT SERVE_CHECK_EXTRA=${SERVE_CHECK_EXTRA-freekv_dense16k} \
  bash benchmarks/gpu_serve_check.sh
sc=$?

cp "$S/summary.json" "$OUT/serve_summary.json" 2>/dev/null
cp "$S/check.log" "$OUT/serve_check.log" 2>/dev/null
cp "$G/pytest.log" "$OUT/gpu_check_pytest.log" 2>/dev/null
cp "$G/env.log" "$OUT/gpu_check_env.log" 2>/dev/null
tar -czf "$OUT/serve_logs.tgz" -C "$S" --exclude=summary.json --exclude=check.log . 2>/dev/null
tar -czf "$OUT/gpu_check.tgz" -C "$G" . 2>/dev/null
echo "== done: gpu_check.sh $gc, gpu_serve_check.sh $sc, $(( $(date +%s) - T0 )) s; $(ls "$OUT" | tr '\n' ' ')"
exit $(( gc != 0 || sc != 0 ))
