"""Concurrency at equal device memory: default vs FreeKV (CPU, simulated device memory).

Both servers see the same simulated device (``SGLANG_FREEKV_CPU_DEVICE_GB``, ~2.5 dense
~6.2K-token float32 contexts of KV after the weights; ``tests/capacity.py``); ``--requests``
passkey prompts of ~6.2K tokens are sent at once to each. Reported per policy: SGLang's
logical token pool (``max_total_num_tokens``), the most requests running at once
(``sglang:num_running_reqs``), keys found, wall time of the batch.

    python benchmarks/bench_capacity.py [--requests 10] [--name bench_capacity_cpu]

Writes JSON + PNG to benchmarks/results (and ``$OUT/`` when OUT is set) and prints a table;
never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import plot_concurrency, write_results  # noqa: E402

from tests.capacity import (  # noqa: E402
    CONTEXT_LENGTH,
    DEVICE_GB,
    FREEKV_CFG,
    MEM_FRACTION,
    NEW_TOKENS,
    PROMPT_TOKENS,
    as_dict,
    run_capacity,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--policies", default="default,freekv")
    ap.add_argument("--name", default="bench_capacity_cpu", help="result file stem")
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            print(f"== {policy}: {args.requests} requests of {PROMPT_TOKENS} tokens", flush=True)
            runs[policy] = run_capacity(policy, args.requests, Path(tmp))
    print(f"\nsimulated device {DEVICE_GB} GiB, --mem-fraction-static {MEM_FRACTION}, "
          f"--context-length {CONTEXT_LENGTH}, float32, FreeKV {json.dumps(FREEKV_CFG)}")
    print(f"{'policy':<8} {'max_total_tokens':>16} {'max running':>12} {'keys found':>11} "
          f"{'seconds':>8}")
    for name, run in runs.items():
        print(f"{name:<8} {run.max_total_tokens!s:>16} {run.max_running:>12} "
              f"{sum(run.found):>5}/{len(run.found):<5} {run.seconds:>8.1f}")
    result = {
        "benchmark": "bench_capacity",
        "device_gb": DEVICE_GB,
        "mem_fraction_static": MEM_FRACTION,
        "context_length": CONTEXT_LENGTH,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "freekv_config": FREEKV_CFG,
        "dtype": "float32",
        "runs": {k: as_dict(v) for k, v in runs.items()},
    }
    rows = [{"policy": name, "context": PROMPT_TOKENS + NEW_TOKENS,
             "max_concurrency": run.max_running, "measured": True}
            for name, run in runs.items()]
    write_results(args.name, result, plot=lambda: plot_concurrency(
        rows, device_memory_gb=DEVICE_GB,
        subtitle=f"float32, FreeKV budget {FREEKV_CFG['budget']}, {args.requests} requests"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
