"""Recall bandwidth: HND (page, head) blocks vs NHD rows; one vs two staging buffers.

Figures (bytes moved = recalled K+V payload, GB/s = 1e9 B/s):
* ``hnd_recall_2buf`` / ``hnd_recall_1buf``: FreeKVRecallEngine.recall (CPU gather of
  contiguous HND blocks into pinned staging, one H2D per group, scatter) with 2 / 1 buffers.
* ``hnd_block_memcpy``: one copy per (page, head) block straight from the host pool (the
  paper's 16 KiB cudaMemcpyAsync loop), for reference.
* ``nhd_rows``: host layout ``[pages, P, H, D]`` per K/V; a (page, head) unit is 2*P rows of
  D elements, copied row by row (the NHD baseline of freekv-method.md §4).
* ``h2d_pinned`` (CUDA only): one large pinned tensor -> device, the bar for the above.
Bars (CUDA): hnd_recall_2buf >= 70% of h2d_pinned and >= 5x nhd_rows.

Usage: python benchmarks/bench_recall.py [--device cpu|cuda] [--quick]
Writes benchmarks/results/bench_recall_<device>[_quick].{json,png} (GB/s per path; and $OUT/
when set).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import plot_recall, progress, write_results  # noqa: E402

from sglang_freekv.pool_host import FreeKVHostPool  # noqa: E402
from sglang_freekv.recall import FreeKVRecallEngine  # noqa: E402


def _timeit(fn: Callable[[], None], device: torch.device, iters: int, desc: str) -> float:
    """Median seconds of ``fn`` over ``iters`` runs after one warm-up (progress bar ``desc``)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in progress(range(iters), desc=desc):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run(device: torch.device, quick: bool) -> dict[str, object]:
    cuda = device.type == "cuda"
    p, d, h = 32, 128, 8
    dtype = torch.bfloat16
    num_pages = 512 if quick else 2048
    n_blocks = 256 if quick else 1024  # blocks per recall (4 / 16 MiB at 16 KiB)
    n_rows_blocks = 16 if quick else 64  # the row baseline is slow; fewer blocks
    iters = 3 if quick else 7
    pool = FreeKVHostPool(1, num_pages, h, p, d, dtype, pin_memory=cuda)
    pool.kv.copy_(torch.randn(pool.kv.shape, dtype=torch.float32).to(dtype))
    slots = n_blocks // h + 1
    kb = [torch.zeros(slots * p, h, d, dtype=dtype, device=device)]
    vb = [torch.zeros(slots * p, h, d, dtype=dtype, device=device)]
    gen = torch.Generator().manual_seed(0)
    host_ids = torch.randint(num_pages, (n_blocks,), generator=gen)
    heads_cpu = torch.arange(n_blocks) % h
    heads = heads_cpu.to(device, torch.int32)
    dst = ((torch.arange(n_blocks) // h) * p).to(device)
    block_bytes = 2 * p * d * 2
    res: dict[str, object] = {"device": str(device), "block_bytes": block_bytes,
                              "blocks_per_recall": n_blocks, "page_size": p, "head_dim": d,
                              "num_kv_heads": h, "dtype": str(dtype), "quick": quick}
    gbps: dict[str, float] = {}
    for ns in (2, 1):
        eng = FreeKVRecallEngine(pool, kb, vb, device=device, group_blocks=64, num_staging=ns)

        def recall(eng: FreeKVRecallEngine = eng) -> None:
            ev = eng.recall(0, host_ids, heads, dst, mode="sync", heads_cpu=heads_cpu)
            if ev is not None:
                torch.cuda.current_stream().wait_event(ev)

        t = _timeit(recall, device, iters, f"hnd_recall_{ns}buf")
        gbps[f"hnd_recall_{ns}buf"] = n_blocks * block_bytes / t / 1e9
        eng.close()
    staging = torch.empty(n_blocks, 2, p, d, dtype=dtype, device=device)
    ids_list, heads_list = host_ids.tolist(), heads_cpu.tolist()

    def block_memcpy() -> None:
        for i in range(n_blocks):  # one contiguous copy per (page, head)
            staging[i].copy_(pool.kv[0, ids_list[i], heads_list[i]], non_blocking=True)

    t = _timeit(block_memcpy, device, iters, "hnd_block_memcpy")
    gbps["hnd_block_memcpy"] = n_blocks * block_bytes / t / 1e9
    # NHD host layout: [pages, P, H, D] per K and V; 2*P rows of D per (page, head).
    k_nhd = torch.empty(num_pages, p, h, d, dtype=dtype, pin_memory=cuda)
    v_nhd = torch.empty(num_pages, p, h, d, dtype=dtype, pin_memory=cuda)
    k_nhd.copy_(pool.kv[0, :, :, 0].transpose(1, 2))
    v_nhd.copy_(pool.kv[0, :, :, 1].transpose(1, 2))

    def nhd_rows() -> None:
        for i in range(n_rows_blocks):
            pg, hd = ids_list[i], heads_list[i]
            for t in range(p):
                staging[i, 0, t].copy_(k_nhd[pg, t, hd], non_blocking=True)
                staging[i, 1, t].copy_(v_nhd[pg, t, hd], non_blocking=True)

    gbps["nhd_rows"] = n_rows_blocks * block_bytes / _timeit(nhd_rows, device, iters,
                                                               "nhd_rows") / 1e9
    if cuda:
        big = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dev_big = torch.empty_like(big, device=device)
        t = _timeit(lambda: dev_big.copy_(big, non_blocking=True), device, iters,
                    "h2d_pinned")
        gbps["h2d_pinned"] = big.numel() / t / 1e9
        res["bar_hnd_vs_h2d"] = gbps["hnd_recall_2buf"] / gbps["h2d_pinned"]
        res["bar_ok"] = bool(res["bar_hnd_vs_h2d"] >= 0.7 and
                             gbps["hnd_recall_2buf"] >= 5 * gbps["nhd_rows"])
    res["gbps"] = gbps
    res["hnd_over_nhd_rows"] = gbps["hnd_recall_2buf"] / gbps["nhd_rows"]
    res["two_over_one_buf"] = gbps["hnd_recall_2buf"] / gbps["hnd_recall_1buf"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CPU < 15 s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the copies are small, and OpenMP "
                         "oversubscription on a busy host costs 10x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    res = run(device, args.quick)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"recall bandwidth on {device} ({res['block_bytes']} B blocks, "
          f"{res['blocks_per_recall']} blocks/recall)")
    print(f"{'path':<20}{'GB/s':>10}")
    for name, v in res["gbps"].items():  # type: ignore[union-attr]
        print(f"{name:<20}{v:>10.3f}")
    print(f"HND / NHD-rows: {res['hnd_over_nhd_rows']:.1f}x; 2 buf / 1 buf: "
          f"{res['two_over_one_buf']:.2f}x" +
          (f"; HND / pinned H2D: {res['bar_hnd_vs_h2d']:.0%} (bar ok: {res['bar_ok']})"
           if "bar_ok" in res else ""))
    subtitle = (f"{device.type}, {res['block_bytes']} B (page, head) blocks, "
                f"{res['blocks_per_recall']} blocks per recall")
    write_results(f"bench_recall_{device.type}" + ("_quick" if args.quick else ""), res,
                  plot=lambda: plot_recall(res["gbps"], subtitle=subtitle))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
