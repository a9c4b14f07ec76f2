"""A decode step of a synthetic SmolLM2 with FreeKV's hooks, in process: no server, low noise.

The server benchmark (``bench_decode.py``) cannot resolve changes under ~10% on a shared
2-core machine; this one runs the same step shape in one process. Per layer: the model's
projections and MLP as real bf16 matmuls (random weights, SmolLM2-135M shapes: hidden 576,
MLP 1536, 9 query / 3 KV heads of 64, 30 layers) and an attention stand-in (gather the rows,
SDPA, as SGLang's torch_native decode does per request); after the last layer the LM head
(vocabulary 49152). Under FreeKV the engine calls the same
:class:`~sglang_freekv.cache.FreeKVCache` hooks it calls in the server: ``plan_decode``, and
per sparse layer ``prepare_layer`` + the token's K/V write into its budget slot +
``before_attention`` (wait the speculative job, correction), attention over the budget rows
and ``after_attention`` (write-through, job submission), and the step job runs on the worker
while the next step runs, as in the server. FreeKV's dense layers (layer 0 by default)
attend the whole context, as the default policy's layers do.

Configurations (each measured in interleaved rounds, one process):

- ``freekv``: budget 1024 (sink 128, window 256, pages of 32), speculative, at ``--context``;
- ``freekv_sync``: the same, ``"speculative": false``;
- ``default``: attention over the whole context, no FreeKV, at ``--context``;
- ``default_short``: the same at ``--short-context`` (the ceiling: attention over about the
  budget's rows);
- ``freekv_short``: FreeKV (speculative) at ``--short-context`` (below the budget: the
  dense regime, where FreeKV should cost nothing; with the defaults the request grows past
  the budget of 1024 after 24 steps, and the ratios also split its steps into those below
  the budget and those past it).

Keys are random; each step's query is ``base + sigma * noise`` with ``sigma`` 0.3 on most
(step, layer) pairs and 1.2 on ``--drift`` of them, so that about a fifth of the heads are
corrected per step, as in the server at 6.5K (docs/design.md, "Where a CPU decode step goes").

    python benchmarks/bench_step_cpu.py [--context 6500] [--short-context 1000] [--batch 1]
        [--steps 24] [--warmup 6] [--rounds 3] [--drift 0.15] [--dtype bfloat16]

Prints and writes ``benchmarks/results/<--out>.json`` and ``.png`` (default
``bench_step_cpu``): per configuration the median step time and tokens/s, the attention
stand-in's time, FreeKV's time on the engine thread (hooks, of which waiting the
speculative job), the speculative jobs' time on the worker per step (mean; the jobs of the
last warmup step count towards the first measured one), the checked /
corrected heads and recalled (page, head) blocks per step, and the ratios the issue's bars
use. The model is synthetic: the ratios are FreeKV's cost next to a model of this size, not
the server's tokens/s. Timings are never asserted.
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

from _results import plot_step, write_results  # noqa: E402

import sglang_freekv.cache as cache_mod  # noqa: E402
from sglang_freekv.config import FreeKVConfig  # noqa: E402
from sglang_freekv.reference import ReferenceDecoder  # noqa: E402

LAYERS, HQ, H, D = 30, 9, 3, 64
HIDDEN, MLP, VOCAB = 576, 1536, 49152
COUNTERS = ("checked_heads", "corrected_heads", "recalled_pages")
CONFIGS = ("freekv", "freekv_sync", "default", "default_short", "freekv_short")


class SyntheticModel:
    """Random-weight matmuls of SmolLM2-135M's decode step (``dtype``, CPU)."""

    def __init__(self, dtype: torch.dtype, gen: torch.Generator) -> None:
        def w(i: int, o: int) -> torch.Tensor:
            return (torch.randn(i, o, generator=gen) * i ** -0.5).to(dtype)

        self.qkv = [w(HIDDEN, (HQ + 2 * H) * D) for _ in range(LAYERS)]
        self.o = [w(HQ * D, HIDDEN) for _ in range(LAYERS)]
        self.gate_up = [w(HIDDEN, 2 * MLP) for _ in range(LAYERS)]
        self.down = [w(MLP, HIDDEN) for _ in range(LAYERS)]
        self.lm_head = w(HIDDEN, VOCAB)

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        """``x [bs, HIDDEN]``: the QKV projection (its output is not used: the benchmark's
        queries are drawn so that drift is controlled)."""
        torch.nn.functional.rms_norm(x, (HIDDEN,)) @ self.qkv[layer]

    def post_attention(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``o [bs, HQ, D]`` attention output -> the next hidden state ``[bs, HIDDEN]``."""
        x = x + o.reshape(x.shape[0], -1) @ self.o[layer]
        gu = torch.nn.functional.rms_norm(x, (HIDDEN,)) @ self.gate_up[layer]
        g, u = gu.chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(g) * u) @ self.down[layer]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.rms_norm(x, (HIDDEN,)) @ self.lm_head).argmax(-1)


def attention(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
              idx: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Stand-in for the engine's attention (SGLang's torch_native decode does the same per
    request): gather the rows ``idx[b]`` (int64), SDPA. ``q [bs, Hq, D]``, ``kb``/``vb
    [rows, H, D]``."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        k, v = kb[idx[b]].movedim(0, 1), vb[idx[b]].movedim(0, 1)  # [H, n, D]
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q[b][:, None], k, v, scale=scale, enable_gqa=True)[:, 0]
    return out


class Run:
    """One configuration's decoder, requests and measurements (steps resume across rounds)."""

    def __init__(self, name: str, context: int, args: argparse.Namespace,
                 model: SyntheticModel, dtype: torch.dtype) -> None:
        self.name, self.args, self.model, self.dtype = name, args, model, dtype
        self.freekv = name.startswith("freekv")
        cfg = FreeKVConfig(budget=1024, sink=128, window=256,
                           speculative=name != "freekv_sync")
        total = (args.warmup + args.steps) * args.rounds
        self.dec = ReferenceDecoder(cfg, num_layers=LAYERS, num_qo_heads=HQ, num_kv_heads=H,
                                    head_dim=D, dtype=dtype, max_reqs=args.batch,
                                    max_len=context + total + 1, seed=0)
        self.rows = [self.dec.add_request(context) for _ in range(args.batch)]
        # layers FreeKV runs sparse (its dense layers attend the whole context, as default)
        self.sparse_layers = set(self.dec.cache.sparse_layers) if self.freekv else set()
        self.gen = torch.Generator().manual_seed(1)
        self.base = torch.randn(LAYERS, args.batch, HQ, D, generator=self.gen).to(dtype)
        self.x = torch.randn(args.batch, HIDDEN, generator=self.gen).to(dtype)
        self.per_step: list[dict[str, float]] = []
        self.job_s: list[float] = []
        self.wait_s = 0.0
        cache = self.dec.cache
        wait_job = cache._wait_job

        def timed_wait(layer: int) -> None:  # engine thread: time spent waiting the job
            t = time.perf_counter()
            wait_job(layer)
            self.wait_s += time.perf_counter() - t

        cache._wait_job = timed_wait  # type: ignore[method-assign]

    def step(self, measured: bool) -> None:
        dec, cache, bs = self.dec, self.dec.cache, self.args.batch
        rows_t = torch.tensor(self.rows, dtype=torch.int64)
        n_t = torch.tensor([dec.seq_len[r] + 1 for r in self.rows], dtype=torch.int64)
        before = {k: cache.stats()[k] for k in COUNTERS}
        self.wait_s = 0.0
        t_start = time.perf_counter()
        hooks = attn = 0.0
        if self.freekv:
            plan = cache.plan_decode(rows_t, n_t, n_t, rows_t)
            hooks = time.perf_counter() - t_start
            idx = [plan.kv_indices[a:b].to(torch.int64)
                   for a, b in zip(plan.kv_indptr.tolist(), plan.kv_indptr.tolist()[1:])]
        # the whole context's rows: the default policy, and FreeKV's dense layers (layer 0)
        dense_idx = [dec.req_to_token[r, :n] for r, n in zip(self.rows, n_t.tolist())]
        dense_loc = dec.req_to_token[rows_t, n_t - 1]
        x = self.x
        for layer in range(LAYERS):
            self.model.pre_attention(layer, x)
            big = torch.rand(bs, generator=self.gen) < self.args.drift
            sigma = torch.where(big, 1.2, 0.3).to(self.dtype)[:, None, None]
            q = self.base[layer] + sigma * torch.randn(bs, HQ, D, generator=self.gen).to(
                self.dtype)
            k_new = torch.randn(bs, H, D, generator=self.gen).to(self.dtype)
            v_new = torch.randn(bs, H, D, generator=self.gen).to(self.dtype)
            kb, vb = dec.k_buffers[layer], dec.v_buffers[layer]
            # As in the server: a FreeKV sparse layer writes the token into its budget slot
            # and attends the budget rows; a dense layer (and the default policy) writes it
            # after the context and attends every row.
            # The hooks' time excludes the token's write (the engine's, in every policy).
            sparse = layer in self.sparse_layers
            if sparse:
                t0 = time.perf_counter()
                cache.prepare_layer(layer, plan)
                t1 = time.perf_counter()
                kb[plan.token_loc], vb[plan.token_loc] = k_new, v_new
                t2 = time.perf_counter()
                cache.before_attention(layer, plan, q)
                hooks += (t1 - t0) + (time.perf_counter() - t2)
            else:
                kb[dense_loc], vb[dense_loc] = k_new, v_new
            t1 = time.perf_counter()
            o = attention(q, kb, vb, idx if sparse else dense_idx, dec.scale)
            t2 = time.perf_counter()
            if sparse:
                cache.after_attention(layer, plan, q)
                hooks += time.perf_counter() - t2
            attn += t2 - t1
            x = self.model.post_attention(layer, x, o)
        self.model.head(x)
        step_s = time.perf_counter() - t_start
        for r, n in zip(self.rows, n_t.tolist()):
            dec.seq_len[r] = n
        # Counters of the step's own corrections (the step job's recalls land in the next
        # step's count: same per-step rate over a run).
        after = cache.stats()
        if measured:
            self.per_step.append({"step_ms": step_s * 1e3, "hooks_ms": hooks * 1e3,
                                  "attention_ms": attn * 1e3,
                                  "job_wait_ms": self.wait_s * 1e3,
                                  **{k: float(after[k] - before[k]) for k in COUNTERS}})

    def close(self) -> None:
        self.dec.cache.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=6500)
    ap.add_argument("--short-context", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=24, help="measured steps per round")
    ap.add_argument("--warmup", type=int, default=6, help="unmeasured steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drift", type=float, default=0.15,
                    help="share of (step, layer) queries drawn with the large noise")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--out", default="bench_step_cpu",
                    help="result file stem (benchmarks/results/<out>.json)")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not configs or any(c not in CONFIGS for c in configs):
        ap.error(f"--configs takes a comma-separated subset of {', '.join(CONFIGS)}")
    if not 1024 <= args.context <= 32768 or not 1 <= args.short_context <= 32768:
        ap.error("--context in [1024, 32768], --short-context in [1, 32768]")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--batch, --steps, --rounds >= 1 and --warmup >= 0")
    if not 0.0 <= args.drift <= 1.0:
        ap.error("--drift must be in [0, 1]")
    dtype = getattr(torch, args.dtype)

    model = SyntheticModel(dtype, torch.Generator().manual_seed(2))
    job_s: list[float] = []
    run_job = cache_mod.run_step_job

    def timed_job(*a: Any, **kw: Any) -> None:  # the step job, timed on the worker
        t = time.perf_counter()
        run_job(*a, **kw)
        job_s.append(time.perf_counter() - t)

    cache_mod.run_step_job = timed_job  # type: ignore[assignment]
    runs = {c: Run(c, args.short_context if c.endswith("_short") else args.context, args,
                   model, dtype) for c in configs}
    jobs: dict[str, list[float]] = {c: [] for c in configs}
    try:
        for _ in range(args.rounds):
            for c, run in runs.items():
                for i in range(args.warmup + args.steps):
                    if i == args.warmup:
                        n_jobs = len(job_s)
                    run.step(measured=i >= args.warmup)
                run.dec.cache.recall.wait_all()  # SYNC: benchmark only, between rounds
                jobs[c] += job_s[n_jobs:]  # the measured steps' jobs (a step has two)
    finally:
        cache_mod.run_step_job = run_job  # type: ignore[assignment]
        for run in runs.values():
            run.close()

    out: dict[str, Any] = {}
    print(f"Synthetic SmolLM2 decode step ({args.dtype}, batch {args.batch}, context "
          f"{args.context}, short {args.short_context}, {args.rounds} x {args.steps} steps, "
          f"threads {torch.get_num_threads()}), medians:")
    for c, run in runs.items():
        med = {k: statistics.median(s[k] for s in run.per_step) for k in run.per_step[0]}
        med["tok_s"] = args.batch * 1e3 / med["step_ms"]
        # worker time of the speculative jobs per measured step (mean: a step has two)
        med["step_job_ms"] = sum(jobs[c]) * 1e3 / (args.rounds * args.steps)
        out[c] = {"median": med, "per_step": run.per_step}
        print(f"  {c:<14} " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
    ratios = {}

    def tok(c: str) -> float | None:
        return out[c]["median"]["tok_s"] if c in out else None

    for name, a, b in (("freekv_over_default", "freekv", "default"),
                       ("ceiling", "freekv", "default_short"),
                       ("speculative_over_synchronous", "freekv", "freekv_sync"),
                       ("short_freekv_over_default", "freekv_short", "default_short")):
        ta, tb = tok(a), tok(b)
        if ta is not None and tb is not None:
            ratios[name] = ta / tb
            print(f"  {name:<30} {ratios[name]:.3f}")
    if "freekv_short" in out and "default_short" in out:
        # The short requests cross the budget while running (1000 + the steps > 1024): the
        # steps where FreeKV was dense (no head checked) and those past the budget, each
        # against the default policy's steps at the same positions (informative).
        fs, ds = out["freekv_short"]["per_step"], out["default_short"]["per_step"]
        for name, dense in (("short_below_budget", True), ("short_past_budget", False)):
            idx = [i for i, s in enumerate(fs) if (s["checked_heads"] == 0) == dense]
            if len(idx) >= 4:
                ratios[name] = (statistics.median(ds[i]["step_ms"] for i in idx)
                                / statistics.median(fs[i]["step_ms"] for i in idx))
                print(f"  {name:<30} {ratios[name]:.3f} ({len(idx)} steps)")
    write_results(args.out, {
        "benchmark": "bench_step_cpu", "context": args.context,
        "short_context": args.short_context, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "drift": args.drift,
        "dtype": args.dtype, "layers": LAYERS, "qo_heads": HQ, "kv_heads": H, "head_dim": D,
        "hidden": HIDDEN, "mlp": MLP, "vocab": VOCAB, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "configs": out, "ratios": ratios},
        plot=lambda: plot_step({c: v["median"] for c, v in out.items()}, subtitle=(
            f"{args.dtype}, context {args.context} / short {args.short_context}, batch "
            f"{args.batch}, {torch.get_num_threads()} threads")))


if __name__ == "__main__":
    main()
