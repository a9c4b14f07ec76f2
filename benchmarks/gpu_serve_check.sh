#!/usr/bin/env bash
# FreeKV GPU serving check: the real SGLang 0.5.23 server on the GPU check machine (torch 2.11,
# triton 3.6, nvcc 13.0, no network, no sglang/flashinfer/sgl-kernel), --kv-policy default vs
# freekv, from the bundle built here by benchmarks/gpu_bundle/build.py (.gpu_bundle/out, carried).
#
#   OUT=/path bash benchmarks/gpu_serve_check.sh            # on the GPU machine (< 9 minutes)
#   OUT=/tmp/dry bash benchmarks/gpu_serve_check.sh --dry-run  # here: everything up to the GPU
#
# Writes to $OUT (at most 8 files): summary.json (every step's result or error, the verdict:
# greedy token ids at budget >= context, decode tok/s at a 16K context, start-up lines),
# check.log (this script's output), preflight.log, server_<run>.log per server.
# A failing step never stops the next; every step has a timeout. Env: GPU_SERVE_CHECK_BUDGET_S
# (total seconds, default 520), FREEKV_GPU_BUNDLE, FREEKV_GPU_SITE, PYTHON, SERVE_CHECK_RUNS,
# SERVE_CHECK_EXTRA (optional runs while time is left; "" for none).
set -uo pipefail
T0=$(date +%s)
BUDGET=${GPU_SERVE_CHECK_BUDGET_S:-520}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$REPO/benchmarks/results/gpu_serve}
BUNDLE=${FREEKV_GPU_BUNDLE:-$REPO/.gpu_bundle/out}
SITE=${FREEKV_GPU_SITE:-/tmp/freekv_site}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "== [$(date +%H:%M:%S), $(left) s left] $*"; }
status=0

say "install the bundle into $SITE"
if ! timeout 90 "$PY" benchmarks/gpu_bundle/install_site.py --bundle "$BUNDLE" --site "$SITE"; then
  say "install FAILED"
  status=1
fi

# The GPU machine's nvcc may be a wrapper script: FlashInfer's and SGLang's JIT builds need the
# real toolkit root (bin/nvcc, include, lib64).
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)" 2>/dev/null)")" 2>/dev/null)"; do
    if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -d "$c/include" ]; then export CUDA_HOME=$c; break; fi
  done
fi
export FREEKV_GPU_CHECK=1                             # activates the check platform
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python  # the Rust TreeCore .so is not carried
export TVM_FFI_DISABLE_TORCH_C_DLPACK=1               # no DLPack add-on build at import
export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1         # sgl_kernel is the stub
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/freekv_flashinfer}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 FREEKV_STUB_LOG=1
export MAX_JOBS=${MAX_JOBS:-16}

if [ "$DRY" = 1 ]; then
  VPY=${VENV_PYTHON:-$REPO/.venv/bin/python}
  # The GPU machine's own versions of pure-Python packages that differ from the venv's
  # (transformers 5.17), unpacked by build.py: imported first by the dry-run steps below.
  MIRROR=$REPO/.gpu_bundle/cache/mirror/site
  [ -d "$MIRROR" ] || MIRROR=
  say "dry run: the bundle's cp312 extension modules load under CPython 3.12 (no torch here)"
  PY312=${PY312:-}
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -z "$PY312" ] && "$c" -c pass >/dev/null 2>&1; then PY312=$c; fi
  done
  if [ -n "$PY312" ]; then
    SHIM=$(mktemp -d /tmp/freekv_te.XXXX)  # typing_extensions: on the GPU machine, not here
    "$VPY" -c "import typing_extensions, shutil; shutil.copy(typing_extensions.__file__, '$SHIM')"
    PYTHONPATH=$SITE:$SHIM timeout 60 "$PY312" -c "
import importlib, sys
mods = ['orjson', 'msgspec', 'zmq', 'pydantic_core', 'pydantic', 'rpds', 'setproctitle',
        'pybase64', '_cffi_backend', 'jiter', 'tvm_ffi', 'soundfile']
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f'{m}: {type(e).__name__}: {e}')
print(sys.version.split()[0], 'loads', len(mods) - len(bad), 'of', len(mods), 'modules', bad or '')
sys.exit(1 if bad else 0)" || status=1
    rm -rf "$SHIM"
  else
    say "no working python3.12 here: skipped"
  fi
  say "dry run: prebuilt FlashInfer modules load (tvm_ffi, $VPY)"
  timeout 120 "$VPY" -c "
import sys, glob, tvm_ffi
sos = sorted(glob.glob('$SITE/flashinfer/data/aot/*/*.so'))
for so in sos:
    m = tvm_ffi.load_module(so)
    print('loaded', so.split('/')[-1][:90])
print(len(sos), 'prebuilt modules')" || status=1
  say "dry run: the server's import path under a fake H200 (import_check.py)"
  timeout 300 "$VPY" benchmarks/gpu_bundle/import_check.py --json "$OUT/import_check.json" --overlay "$SITE" ${MIRROR:+--mirror "$MIRROR"} \
    --model "$("$VPY" -m sglang_freekv.models smollm2)" | tail -3 || status=1
  say "dry run: serve_check.py --dry-run (preflight under the fake H200, model on CPU)"
  CHECK_SITE=$(mktemp -d /tmp/freekv_check_pkg.XXXX)
  "$VPY" -c "import sys; sys.path.insert(0, 'benchmarks/gpu_bundle'); import build, pathlib; build.write_check_package(pathlib.Path('$CHECK_SITE'))"
  PYTHONPATH=${MIRROR:+$MIRROR:}$CHECK_SITE:$REPO FREEKV_FAKE_CUDA=1 timeout 300 "$VPY" benchmarks/gpu_bundle/serve_check.py \
    --out "$OUT" --model-src "$BUNDLE/model" --model-dir /tmp/freekv_check_model_dry \
    --bundle-json "$BUNDLE/bundle.json" --budget-s 280 --dry-run || status=1
  rm -rf "$CHECK_SITE"
  say "dry run done (status $status); $OUT"
  exit $status
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA device visible to $PY: nothing launched (use --dry-run on a machine without a GPU)"
  printf '{"result": "no CUDA device visible to %s; nothing launched"}\n' "$PY" > "$OUT/summary.json"
  exit 3
fi
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
REMAIN=$(( $(left) - 20 ))
say "serve_check.py (budget $REMAIN s)"
rm -f /tmp/freekv_serve_check.pgids
timeout -k 10 $(( REMAIN + 15 )) "$PY" benchmarks/gpu_bundle/serve_check.py --out "$OUT" \
  --model-src "$BUNDLE/model" --bundle-json "$BUNDLE/bundle.json" --budget-s "$REMAIN" \
  --runs "${SERVE_CHECK_RUNS:-default,freekv}" \
  --extra "${SERVE_CHECK_EXTRA-freekv_dense16k,default_graphs}"
rc=$?
if [ $rc -ne 0 ]; then
  say "serve_check.py exited $rc"
  status=1
fi
if [ ! -s "$OUT/summary.json" ]; then
  printf '{"result": "serve_check.py wrote no summary (exit %s); see check.log"}\n' "$rc" > "$OUT/summary.json"
fi
# Files come back at 16 MiB each at most: keep the end of any long server log.
for f in "$OUT"/server_*.log; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 12000000 ] && { tail -c 12000000 "$f" > "$f.t" && mv "$f.t" "$f"; }
done
# Leave no server behind: servers run in their own sessions (serve_check.py stops them; this
# catches a driver killed by its timeout), by the process-group ids it recorded.
if [ -f /tmp/freekv_serve_check.pgids ]; then
  while read -r pg; do kill -KILL -- "-$pg" 2>/dev/null; done < /tmp/freekv_serve_check.pgids
fi
say "done (status $status); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
