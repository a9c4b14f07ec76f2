"""FreeKV's own work per decode step on CPU, in process: no server, no model, low noise.

The server benchmark (``bench_decode.py``) cannot resolve changes under ~10% on a shared
2-core machine; this one times only what FreeKV adds to a step, through the same
:class:`~sglang_freekv.cache.FreeKVCache` hooks a CPU engine calls: ``plan_decode``, and per
layer ``prepare_layer`` + the token's K/V write + ``before_attention`` (wait the speculative
job, correction) and ``after_attention`` (write-through, the step job's submission). Between
them a stand-in attention over the budget rows (gather + SDPA per request, as SGLang's
torch_native decode) runs, timed apart, so the speculative job on
the worker overlaps work as it does in the server.

Shapes of the embedded model (SmolLM2-135M: 30 layers, 9 query / 3 KV heads of 64, bf16),
FreeKV budget 1024 (sink 128, window 256, pages of 32), ``--batch`` requests of
``--context`` tokens. Keys are random; each step's query is ``base + sigma * noise`` with
``sigma`` 0.3 on most steps and 1.2 on ``--drift`` of them (per layer), so that about a
fifth of the heads are corrected per step, as in the server at 6.5K (docs/design.md, "Where a
CPU decode step goes"); the run reports the rates it got.

    python benchmarks/bench_step_cpu.py [--context 6500] [--batch 1] [--steps 40]
        [--warmup 8] [--drift 0.15] [--speculative | --synchronous]

Prints and writes ``benchmarks/results/bench_step_cpu.json``: median ms per step of FreeKV's
hooks on the engine thread (plan, before, after), of the stand-in attention, of the step job
on the worker, and per step the checked / corrected heads and recalled (page, head) blocks.
Timings are never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _results import write_results  # noqa: E402

import sglang_freekv.cache as cache_mod  # noqa: E402
from sglang_freekv.config import FreeKVConfig  # noqa: E402
from sglang_freekv.reference import ReferenceDecoder  # noqa: E402

LAYERS, HQ, H, D = 30, 9, 3, 64
COUNTERS = ("checked_heads", "corrected_heads", "recalled_pages")


def budget_attention(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                     indptr: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Stand-in for the engine's attention (SGLang's torch_native decode does the same per
    request): gather the budget rows, SDPA. ``q [bs, Hq, D]``, ``kb``/``vb [rows, H, D]``."""
    out = torch.empty_like(q)
    bounds = indptr.tolist()
    for b in range(q.shape[0]):
        idx = indices[bounds[b]:bounds[b + 1]].to(torch.int64)
        k, v = kb[idx].movedim(0, 1), vb[idx].movedim(0, 1)  # [H, n, D]
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q[b][:, None], k, v, scale=scale, enable_gqa=True)[:, 0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=6500)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="measured steps")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--drift", type=float, default=0.15,
                    help="share of (step, layer) queries drawn with the large noise")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--synchronous", action="store_true",
                      help='"speculative": false (select + recall before attention)')
    mode.add_argument("--speculative", action="store_true", help="the default")
    ap.add_argument("--out", default="bench_step_cpu",
                    help="result file stem (benchmarks/results/<out>.json)")
    args = ap.parse_args()
    if args.context < 1024 or args.context > 32768 or args.batch < 1 or args.steps < 1:
        ap.error("--context in [1024, 32768], --batch >= 1, --steps >= 1")
    if not 0.0 <= args.drift <= 1.0:
        ap.error("--drift must be in [0, 1]")

    cfg = FreeKVConfig(budget=1024, sink=128, window=256, speculative=not args.synchronous)
    total = args.warmup + args.steps
    dec = ReferenceDecoder(cfg, num_layers=LAYERS, num_qo_heads=HQ, num_kv_heads=H,
                           head_dim=D, dtype=torch.bfloat16, max_reqs=args.batch,
                           max_len=args.context + total + 1, seed=0)
    rows = [dec.add_request(args.context) for _ in range(args.batch)]
    cache = dec.cache
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(LAYERS, args.batch, HQ, D, generator=gen).to(torch.bfloat16)

    job_s: list[float] = []
    run_job = cache_mod.run_step_job

    def timed_job(*a: Any, **kw: Any) -> None:  # the step job, timed on the worker
        t = time.perf_counter()
        run_job(*a, **kw)
        job_s.append(time.perf_counter() - t)

    cache_mod.run_step_job = timed_job  # type: ignore[assignment]
    per_step: list[dict[str, float]] = []
    rows_t = torch.tensor(rows, dtype=torch.int64)
    try:
        for step in range(total):
            n_t = torch.tensor([dec.seq_len[r] + 1 for r in rows], dtype=torch.int64)
            before_stats = {k: cache.stats()[k] for k in COUNTERS}
            t_plan = time.perf_counter()
            plan = cache.plan_decode(rows_t, n_t, n_t, rows_t)
            hooks = time.perf_counter() - t_plan
            plan_s, attn = hooks, 0.0
            dense_loc = dec.req_to_token[rows_t, n_t - 1]
            for layer in range(LAYERS):
                big = torch.rand(args.batch, generator=gen) < args.drift
                sigma = torch.where(big, 1.2, 0.3).to(torch.bfloat16)[:, None, None]
                q = base[layer] + sigma * torch.randn(args.batch, HQ, D, generator=gen).to(
                    torch.bfloat16)
                k_new = torch.randn(args.batch, H, D, generator=gen).to(torch.bfloat16)
                v_new = torch.randn(args.batch, H, D, generator=gen).to(torch.bfloat16)
                kb, vb = dec.k_buffers[layer], dec.v_buffers[layer]
                t0 = time.perf_counter()
                cache.prepare_layer(layer, plan)
                kb[dense_loc], vb[dense_loc] = k_new, v_new
                kb[plan.token_loc], vb[plan.token_loc] = k_new, v_new
                cache.before_attention(layer, plan, q)
                t1 = time.perf_counter()
                budget_attention(q, kb, vb, plan.kv_indptr, plan.kv_indices, dec.scale)
                t2 = time.perf_counter()
                cache.after_attention(layer, plan, q)
                t3 = time.perf_counter()
                hooks += (t1 - t0) + (t3 - t2)
                attn += t2 - t1
            for r, n in zip(rows, n_t.tolist()):
                dec.seq_len[r] = n
            cache.recall.wait_all()  # SYNC: benchmark only, so the counters are complete
            after_stats = cache.stats()
            if step >= args.warmup:
                per_step.append({"hooks_ms": hooks * 1e3, "plan_ms": plan_s * 1e3,
                                 "attention_ms": attn * 1e3,
                                 **{k: float(after_stats[k] - before_stats[k])
                                    for k in COUNTERS}})
    finally:
        cache_mod.run_step_job = run_job  # type: ignore[assignment]
        cache.close()

    med = {k: statistics.median(s[k] for s in per_step) for k in per_step[0]}
    jobs = job_s[args.warmup:] if len(job_s) > args.warmup else job_s
    med["step_job_ms"] = statistics.median(jobs) * 1e3 if jobs else 0.0
    mode_name = "synchronous" if args.synchronous else "speculative"
    print(f"FreeKV hooks per step ({mode_name}, {args.batch} x {args.context} tokens, "
          f"{LAYERS} layers, median of {args.steps} steps, threads {torch.get_num_threads()}):")
    for k, v in med.items():
        print(f"  {k:<16} {v:9.2f}")
    checked = med["checked_heads"]
    if checked:
        print(f"  corrected share  {med['corrected_heads'] / checked:9.2f}")
    result = {"benchmark": "bench_step_cpu", "mode": mode_name, "context": args.context,
              "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "drift": args.drift, "layers": LAYERS, "qo_heads": HQ, "kv_heads": H,
              "head_dim": D, "dtype": "bfloat16", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "median": med, "per_step": per_step}
    write_results(args.out, result)


if __name__ == "__main__":
    main()
