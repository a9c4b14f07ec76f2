"""Prebuild FlashInfer 0.7.2's attention modules for sm_90a on a machine without a GPU.

FlashInfer compiles each kernel module at first use (nvcc + ninja, ~2 min per module on
2 cores here). It also loads a prebuilt module without compiling when
``flashinfer/data/aot/<name>/<name>.so`` exists (``flashinfer.jit.env.get_aot_artifacts``),
so ``build.py`` compiles here, with ``FLASHINFER_CUDA_ARCH_LIST=9.0a``, exactly the modules
the check's servers ask for, and drops them into the bundle's ``data/aot``:

* ``decode``: ``BatchDecodeWithPagedKVCacheWrapper`` without tensor cores (SGLang uses them
  only for GQA groups >= 4; SmolLM2 has 9 q / 3 kv heads), FreeKV's budget-page decode too;
* ``prefill_fa2``: ``BatchPrefillWithPagedKVCacheWrapper`` (SGLang pins ``fa2``);
* ``cascade``: ``merge_state`` (extend over a cached prefix);
* ``prefill_fa3`` (not by default): ``BatchPrefillWithRaggedKVCacheWrapper`` (``auto`` ->
  ``fa3`` on sm_90). Its CUTLASS sm_90a kernels did not finish in 25 min on this 2-core shared
  machine, so by default the check sets ``SGLANG_FLASHINFER_USE_PAGED=1`` instead: SGLang's
  FlashInfer backend then prefills with the (prebuilt) FA2 paged wrapper only.

Compile times measured here (2 shared cores): decode 140 s, prefill_fa2 850 s, cascade 165 s.

Module names (URIs) come from FlashInfer's own generators, so they match what the wrappers
load. A module missing here is JIT-compiled on the GPU machine (nvcc 13.0 is there) and
``serve_check.py`` reports it ("Building JIT module" lines).

Run with a Python that has torch and flashinfer-python==0.7.2 (the project venv):
``python flashinfer_aot.py --workspace DIR --json OUT [--head-dim 64] [--dtype bfloat16]``.
Needs ``CUDA_HOME`` with nvcc 13.x; links against a stub ``libcuda.so`` it makes itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


DEFAULT_MODULES = ("decode", "prefill_fa2", "cascade")


def _stub_libcuda() -> str:
    """FlashInfer links ``-lcuda``; this machine has no driver, so link a stub (soname .so.1)."""
    d = Path(tempfile.mkdtemp(prefix="libcuda_stub_"))
    (d / "empty.c").write_text("")
    subprocess.run(
        ["cc", "-shared", "-o", str(d / "libcuda.so"), "-Wl,-soname,libcuda.so.1", str(d / "empty.c")],
        check=True,
    )
    return str(d)


def _curand_include(cuda_home: str) -> str | None:
    """FA3's CUTLASS headers include curand_kernel.h; a minimal toolkit (like this machine's)
    lacks it. Point at the curand headers of the nvidia-* pip packages, alone in a folder so
    no other toolkit header is shadowed."""
    if (Path(cuda_home) / "include" / "curand_kernel.h").exists():
        return None
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for header in sorted(Path(root).glob("*/include/curand_kernel.h")):
            d = Path(tempfile.mkdtemp(prefix="curand_include_"))
            for h in header.parent.glob("curand*.h"):
                (d / h.name).symlink_to(h)
            return str(d)
    return None


def specs(dtype_name: str, head_dim: int) -> dict[str, Any]:
    import torch
    from flashinfer.jit.attention.modules import (
        _gen_batch_prefill_primary_module,
        gen_batch_decode_module,
        gen_batch_prefill_module,
    )
    from flashinfer.jit.cascade import gen_cascade_module

    dt = getattr(torch, dtype_name)
    # (q, kv, o, idx dtypes, head_dim_qk, head_dim_vo, pos_encoding NONE, no sliding window,
    #  no logits soft cap) as the wrappers' plan() passes them; prefill adds fp16_qk_reduction.
    common = (dt, dt, dt, torch.int32, head_dim, head_dim, 0, False, False)
    return {
        "decode": gen_batch_decode_module(*common),
        "prefill_fa2": _gen_batch_prefill_primary_module("fa2", *common, False),
        "prefill_fa3": gen_batch_prefill_module("fa3", *common, False),
        "cascade": gen_cascade_module(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workspace", required=True, help="FLASHINFER_WORKSPACE_BASE (a cache)")
    parser.add_argument("--json", required=True, help="report: module name -> .so path")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--only", default=",".join(DEFAULT_MODULES),
                        help="comma-separated modules to build (add prefill_fa3 for FA3)")
    parser.add_argument("--force", action="store_true", help="rebuild cached modules")
    args = parser.parse_args()
    if os.environ.get("FLASHINFER_WORKSPACE_BASE") != args.workspace:
        # FlashInfer reads its workspace and arch list at import: re-exec with them set.
        env = dict(os.environ, FLASHINFER_WORKSPACE_BASE=args.workspace)
        env.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
        env["FLASHINFER_EXTRA_LDFLAGS"] = f"-L{_stub_libcuda()}"
        curand = _curand_include(env["CUDA_HOME"])
        if curand:
            env["FLASHINFER_EXTRA_CUDAFLAGS"] = f"-isystem {curand}"
        return subprocess.call([sys.executable, *sys.argv], env=env)

    import flashinfer

    report: dict[str, Any] = {
        "flashinfer": flashinfer.__version__,
        "arch": os.environ["FLASHINFER_CUDA_ARCH_LIST"],
        "modules": {},
    }
    wanted = {s for s in args.only.split(",") if s}
    for label, spec in specs(args.dtype, args.head_dim).items():
        if wanted and label not in wanted:
            continue
        t0 = time.time()
        entry: dict[str, Any] = {"name": spec.name}
        try:
            # A built module is reused: its name encodes every parameter, the sources are
            # FlashInfer's own at this version (the cache path holds version and arch).
            if args.force or not spec.jit_library_path.exists():
                spec.build(verbose=False)
            else:
                entry["cached"] = True
            entry["so"] = str(spec.jit_library_path)
            entry["bytes"] = spec.jit_library_path.stat().st_size
        except Exception as exc:  # noqa: BLE001 - reported; the module then JITs on the GPU
            entry["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        entry["seconds"] = round(time.time() - t0, 1)
        report["modules"][label] = entry
        print(f"flashinfer_aot: {label}: {entry.get('bytes', entry.get('error'))} "
              f"({entry['seconds']} s)", flush=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if all("so" in e for e in report["modules"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
