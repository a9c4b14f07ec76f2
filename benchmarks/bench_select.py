"""Benchmark select_pages (score + softmax + GQA group mean + top-k) per layer.

Grid: context 1K..128K tokens (page 32), batch 1 and 8, 8 KV heads, 32 query heads,
head_dim 128, bf16, default FreeKV budget (2048 tokens: sink 512 + window 512 -> top-k 32).
On CUDA the Triton path is timed with CUDA events after a warm-up, next to the PyTorch
reference as the baseline; on CPU the serving path (``impl="cpu"``, what CPU engines run)
is timed on a smaller grid, next to the reference.

    python benchmarks/bench_select.py [--device auto|cpu|cuda] [--quick]

Prints a table (context, batch, ms per layer, digest GB/s) and writes JSON and a plot (ms
per layer vs context) to benchmarks/results/bench_select_<device>[_quick].{json,png} (and to
$OUT/ when OUT is set).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _results import plot_select, progress, write_results  # noqa: E402

from sglang_freekv.kernels import select_pages  # noqa: E402

PAGE_SIZE = 32
NUM_KV_HEADS = 8
NUM_QO_HEADS = 32
HEAD_DIM = 128
SINK_PAGES = 512 // PAGE_SIZE
WINDOW_PAGES = 512 // PAGE_SIZE
TOP_K = 2048 // PAGE_SIZE - SINK_PAGES - WINDOW_PAGES  # 32

CONTEXTS = {
    "cuda": [1024 << i for i in range(8)],  # 1K .. 128K
    "cpu": [1024, 4096, 16384, 32768],
    "cpu_quick": [1024, 8192],
}
BATCHES = [1, 8]


def _problem(context: int, bs: int, device: torch.device) -> tuple[tuple, int]:
    """Inputs of one layer's selection and the digest bytes it must read."""
    n_pages = context // PAGE_SIZE
    digests = torch.randn(bs * n_pages, NUM_KV_HEADS, 2, HEAD_DIM, device=device)
    digests = digests.sort(dim=2).values.to(torch.bfloat16)  # [num_host_pages, H, 2, D]
    q = torch.randn(bs, NUM_QO_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    page_table = torch.randperm(bs * n_pages, device=device).view(bs, n_pages).to(torch.int32)
    cand_start = torch.full((bs,), SINK_PAGES, dtype=torch.int32, device=device)
    cand_end = torch.full((bs,), max(SINK_PAGES, n_pages - WINDOW_PAGES), dtype=torch.int32,
                          device=device)
    n_cand = max(0, n_pages - WINDOW_PAGES - SINK_PAGES)
    nbytes = bs * n_cand * NUM_KV_HEADS * 2 * HEAD_DIM * digests.element_size()
    return (q, digests, page_table, cand_start, cand_end, NUM_KV_HEADS, TOP_K), nbytes


def _time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Mean ms per call, CUDA events around ``iters`` back-to-back launches."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()  # SYNC: benchmark only
    return start.elapsed_time(end) / iters


def _time_cpu(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller grid, fewer iterations")
    args = parser.parse_args()
    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    if dev_name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device(dev_name)
    torch.manual_seed(0)

    if dev_name == "cuda":
        contexts = CONTEXTS["cuda"]
        if args.quick:
            contexts = contexts[::2] + contexts[-1:]  # 1K, 4K, 16K, 64K, 128K
        warmup, iters = (3, 20) if args.quick else (10, 100)
        impl = "triton"
    else:
        contexts = CONTEXTS["cpu_quick"] if args.quick else CONTEXTS["cpu"]
        warmup, iters = (1, 2) if args.quick else (1, 3)
        impl = "cpu"
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    timer = _time_cuda if dev_name == "cuda" else _time_cpu

    rows: list[dict[str, object]] = []
    header = f"{'context':>8} {'batch':>5} {'impl':>6} {'ms/layer':>10} {'GB/s':>8}"
    header += f" {'ref ms':>9} {'speedup':>8}"
    print(f"select_pages on {dev_name}: H={NUM_KV_HEADS} Hq={NUM_QO_HEADS} D={HEAD_DIM} "
          f"P={PAGE_SIZE} top_k={TOP_K} bf16")
    print(header)
    grid = [(context, bs) for context in sorted(set(contexts)) for bs in BATCHES]
    for context, bs in progress(grid, desc="select_pages"):
        inputs, nbytes = _problem(context, bs, device)
        ms = timer(lambda: select_pages(*inputs, impl=impl), warmup, iters)
        row: dict[str, object] = dict(context=context, batch=bs, impl=impl, ms=ms,
                                      gbps=nbytes / ms / 1e6)
        line = f"{context:>8} {bs:>5} {impl:>6} {ms:>10.4f} {nbytes / ms / 1e6:>8.2f}"
        ref_ms = timer(lambda: select_pages(*inputs, impl="ref"), 1, 3)
        row.update(ref_ms=ref_ms, speedup=ref_ms / ms)
        line += f" {ref_ms:>9.3f} {ref_ms / ms:>8.1f}"
        rows.append(row)
        print(line, flush=True)

    result: dict[str, object] = dict(
        device=torch.cuda.get_device_name() if dev_name == "cuda" else "cpu",
        quick=args.quick, page_size=PAGE_SIZE, num_kv_heads=NUM_KV_HEADS,
        num_qo_heads=NUM_QO_HEADS, head_dim=HEAD_DIM, top_k=TOP_K, dtype="bf16",
        torch=torch.__version__, rows=rows,
    )
    target = [r for r in rows if r["context"] == 131072 and r["batch"] == 8]
    if target:
        ms = float(target[0]["ms"])  # type: ignore[arg-type]
        result["ctx128k_bs8_ms"] = ms
        result["ctx128k_bs8_under_1ms"] = ms < 1.0
        print(f"128K x {NUM_KV_HEADS} heads x batch 8: {ms:.4f} ms per layer "
              f"({'under' if ms < 1.0 else 'NOT under'} 1 ms)")
    else:
        print("128K x batch 8 not in this grid (run on CUDA for the 1 ms check)")

    subtitle = f"{result['device']}, H={NUM_KV_HEADS} Hq={NUM_QO_HEADS} D={HEAD_DIM} top-k={TOP_K}"
    write_results(f"bench_select_{dev_name}" + ("_quick" if args.quick else ""), result,
                  plot=lambda: plot_select(rows, subtitle=subtitle))


if __name__ == "__main__":
    main()
