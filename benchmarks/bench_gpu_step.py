"""FreeKV's decode step on Llama-3.1-8B shapes, captured in a CUDA graph: TPOT and recall.

Issue 11, item 5 (GPU part). torch + triton only (no sglang, no flashinfer). Measures:

* **Time per output token** (one decode step; every request of the batch gets one token) of
  ``dense`` (attention over the whole context, KV on the GPU), ``freekv`` (the core's sync-free
  device step: speculative selection + correction) and ``sync`` (the same FreeKVServing with
  ``"speculative": false``: select with ``q_t`` and recall before attention, every sparse
  layer; the sync mode is the same serving state with its config switched, checked per run by
  the drift-check counter), at each context (32K, 128K) and batch (1, 8), plus ``dense`` at
  the 2K reference context. FreeKV runs the server's default config (budget 2048 = sink 512 +
  32 pages + window 512, tau 0.8, ``dense_layers`` [0]: layer 0 attends over the whole context
  in every FreeKV step too). The whole step (all layers and the LM head) is captured in one
  ``torch.cuda.CUDAGraph``; the plan (``FreeKVServing.plan_decode``; for dense, the lengths
  and token rows) runs on the host before each replay. TPOT = wall time of ``plan + replay``
  over N steps, synchronised once at the end (the host plans step t+1 while the GPU runs step
  t); ``gpu_step_ms`` = median gap between the end events of consecutive replays. If a
  capture fails, the config is timed eagerly and says so (``capture_error``, ``graph``
  false).
* **Graph == eager**: for every graph, one step runs eagerly and then, from the same state
  (FreeKV: budget rows, residency, ``last_q``, served marks and counters snapshotted and
  restored), as a replay; logits and residency are compared.
* **FreeKV == dense** where the budget covers the context (a small check group, eager).
* **Recall**: ``recall_direct`` (the device step's kernel, reading the mapped pinned host tier
  by address) over 256 / 1024 / 4096 blocks, GB/s, against the pinned host-to-device peak
  (``cudaMemcpyAsync`` of a 1 GiB pinned buffer); and per configuration the recall the step
  actually did (blocks per step, turnover, drift corrections).
* **Targets** (reported, never asserted): freekv at 128K within 1.15x of dense at 2K (same
  batch); freekv >= 5x faster than sync at 128K batch 8.

The synthetic model (random weights, seeded, ``torch.empty(...).normal_``): per layer
RMSNorm (no weight) -> QKV projection (4096 -> 6144) -> attention -> O projection -> residual ->
RMSNorm -> gate/up (4096 -> 2x14336) -> SiLU * up -> down -> residual; final RMSNorm, LM head
(4096 -> 128256), argmax. **RoPE is skipped** (a few element-wise ops per layer; keys are
synthetic "post-RoPE" keys anyway). Attention (dense, dense layers of FreeKV and FreeKV's
budget rows) is the benchmark's own Triton split-KV decode kernel over a row table
(``_gpu_step_parts.decode_attention``; a two-pass flash-decoding kernel, checked against an
fp64 PyTorch reference at start-up): the same kernel for every mode.

Synthetic data (knobs below): context K/V are N(0, 1); keys of each (layer, page, KV head) are
shifted by ``key_shift * Exp(1) * sqrt(D)`` along a per-(layer, KV head) direction ``u`` that
the queries share through a bias ``q_bias * sqrt(D) * u`` (some pages matter to every query, as
in real models; plain i.i.d. keys make top-k selection churn far more than real models do).
Step inputs follow an AR(1) process per request (correlation ``drift_rho``; with probability
``jump_prob`` a jump to correlation 0.3) so queries of adjacent steps are similar and some
heads drift past ``tau``. Measured correction and turnover are reported per configuration.

Memory: 8 requests x 128K of 8B KV is 128 GiB of host tier (the machine has 128 GiB), so the
requests of a batch **share their context pages** (prefix sharing, through the serving API as
the radix cache does it: request 0 is prefilled and committed, requests 1.. match its context
as a cached prefix and add their own few suffix tokens); selection, budget slots and recall stay
per request. The dense baseline also reads one shared copy of the context per layer, each
request in its own rotated order (attention is order-invariant) so concurrent programs of
different requests do not hit the same rows in L2 at the same time.

Usage:
  python benchmarks/bench_gpu_step.py [--time-budget S] [--steps N]   # GPU, full shapes
  python benchmarks/bench_gpu_step.py --tiny [--out-dir DIR]           # CPU dry run
``--tiny``: 3 layers, head_dim 16, contexts of 64 and 160 tokens, batches 1 and 2, float32; on
CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) and nothing is captured
(eager only; the "graph" check then compares two eager runs from the same restored state).
``--quick`` keeps the longest context and the largest batch (and 2 layers with ``--tiny``):
the test's run (``tests/test_bench_gpu_step.py``). ``--time-budget``: configurations that no
longer fit are skipped and listed (dense ones run first: a FreeKV failure that breaks the CUDA
context cannot lose them); set-up times (weights, host-tier registration, commits) are in
``setup``.
Writes ``bench_gpu_step_<device>[_tiny].json`` (+ ``.png`` unless ``--no-png``) to
``benchmarks/results`` (or ``--out-dir``) and to ``$OUT`` when set; the JSON is rewritten
after every configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_TINY = "--tiny" in sys.argv
if _TINY and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _gpu_step_parts import (
    LLAMA_8B,
    TINY,
    Group,
    SyntheticModel,
    check_attention,
    decode_attention,
    plot_step,
    print_table,
    time_events,
    time_wall,
)
from _results import output_dirs, write_results

from sglang_freekv.config import FreeKVConfig
from sglang_freekv.kernels.direct import recall_direct
from sglang_freekv.serving import DeviceRows, FreeKVServing


# ---------------------------------------------------------------------------- runners
class DenseRunner:
    """Dense attention at context ``ctx`` (<= the group's) over owner-0 tails."""

    def __init__(self, model: SyntheticModel, grp: Group, bs: int, ctx: int) -> None:
        self.model, self.grp, self.bs, self.ctx = model, grp, bs, ctx
        dev = grp.x.device
        self.table = grp.table(0, bs, ctx).to(dev)
        self.lens = torch.zeros(bs, dtype=torch.int32, device=dev)
        self.tok = torch.zeros(bs, dtype=torch.int64, device=dev)
        self.x = torch.zeros_like(grp.x[0, :bs])
        self.t = 0

    def plan(self) -> None:
        g, t = self.grp, self.t
        n = [self.ctx + g.suffix[b] + t + 1 for b in range(self.bs)]
        tok = [g.tail_row(0, b) + g.suffix[b] + t for b in range(self.bs)]
        _h2d(self.lens, n)
        _h2d(self.tok, tok)
        self.x.copy_(g.x[t, :self.bs])
        self.t += 1

    def attn(self, layer: int, q, k, v) -> torch.Tensor:
        kb, vb = self.grp.k[layer], self.grp.v[layer]
        kb[self.tok] = k
        vb[self.tok] = v
        return decode_attention(q, kb, vb, self.table, self.lens)

    def forward(self) -> torch.Tensor:
        return self.model.forward(self.x, self.attn)

    def snapshot(self) -> Any:  # token writes are idempotent
        return None

    def restore(self, snap: Any) -> None:
        pass


class FreeKVRunner:
    """FreeKV (or sync) decode of the group's first ``bs`` requests through FreeKVServing's
    device step; dense layers attend over owner-1 tails."""

    def __init__(self, model: SyntheticModel, grp: Group, bs: int, bench: Bench) -> None:
        self.model, self.grp, self.bs, self.bench = model, grp, bs, bench
        self.serving: FreeKVServing = bench.serving
        dev = grp.x.device
        self.dense = set(range(model.s.layers)) - set(self.serving.sparse_layers)
        self.table = grp.table(1, bs, grp.ctx).to(dev)
        self.lens = torch.zeros(bs, dtype=torch.int32, device=dev)
        self.tok = torch.zeros(bs, dtype=torch.int64, device=dev)
        self.x = torch.zeros_like(grp.x[0, :bs])
        self.rows_cpu = torch.tensor(grp.rows[:bs], dtype=torch.int64)
        self.plan_obj: Any = None
        self.t = 0

    def plan(self) -> None:
        g, bs = self.grp, self.bs
        for b in range(bs):
            g.n[b] += 1
        lens_cpu = torch.tensor(g.n[:bs], dtype=torch.int64)
        ids = self.bench.new_ids(bs)
        plan = self.serving.plan_decode(self.rows_cpu, lens_cpu, self.rows_cpu, lens_cpu,
                                        ids.to(self.x.device, non_blocking=True),
                                        self.bench.r2t, lanes=bs)
        if self.plan_obj is not None:  # a captured graph reads the same static buffers
            assert plan.kv_table.data_ptr() == self.plan_obj.kv_table.data_ptr()
        self.plan_obj = plan
        _h2d(self.lens, g.n[:bs])
        _h2d(self.tok, [g.tail_row(1, b) + g.n[b] - 1 - g.ctx for b in range(bs)])
        self.x.copy_(g.x[self.t, :bs])
        self.t += 1

    def attn(self, layer: int, q, k, v) -> torch.Tensor:
        if layer in self.dense:
            kb, vb = self.grp.k[layer], self.grp.v[layer]
            kb[self.tok] = k
            vb[self.tok] = v
            return decode_attention(q, kb, vb, self.table, self.lens)
        sv, plan = self.serving, self.plan_obj
        sv.begin_decode_layer(layer, plan, q, k, v)
        o = decode_attention(q, sv.k_buffers[layer], sv.v_buffers[layer], plan.kv_table,
                             plan.kv_lens)
        sv.end_decode_layer(layer, plan, q)
        return o

    def forward(self) -> torch.Tensor:
        return self.model.forward(self.x, self.attn)

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every tensor one step writes that a repeat of the step reads (host-tier and
        digest writes of completed pages are idempotent: same data)."""
        sv = self.serving
        cache, ds, r = sv.cache, sv.device_step, sv.rows
        assert ds is not None
        ts = [cache.residency, cache.last_q, ds.served, ds.stats]
        for layer in sv.sparse_layers:
            for buf in (sv.k_buffers[layer], sv.v_buffers[layer]):
                ts += [buf[:r.budget_rows], buf[r.scratch_row:r.scratch_row + r.page_size]]
        return [(t, t.clone()) for t in ts]

    def restore(self, snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t, saved in snap:
            t.copy_(saved)


def _h2d(dst: torch.Tensor, values: list[int]) -> None:
    """Stream-ordered copy of host ints into a static device tensor (pinned on CUDA)."""
    src = torch.tensor(values, dtype=dst.dtype, pin_memory=dst.is_cuda)
    dst.copy_(src, non_blocking=True)


def _set_speculative(serving: FreeKVServing, on: bool) -> None:
    """The sync baseline: the same serving state with ``speculative`` switched (the device
    step reads ``cache.cfg`` each layer; checked per run through the drift-check counter)."""
    cfg = dataclasses.replace(serving.cfg, speculative=on)
    serving.cfg = cfg
    serving.cache.cfg = cfg


# ---------------------------------------------------------------------------- benchmark
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.s = TINY if args.tiny else LLAMA_8B
        if args.quick:  # the test's subset: one sparse context, the larger batch, and on
            # tiny shapes 2 layers (dense layer 0 + one sparse layer)
            self.s = dataclasses.replace(self.s, contexts=self.s.contexts[-1:],
                                         batches=self.s.batches[-1:],
                                         layers=2 if args.tiny else self.s.layers)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.budget_s = args.time_budget
        self.steps = args.steps if args.steps else (2 if not self.cuda else 20)
        self.warm = 2 if self.cuda else 0  # eager steps before capture (compiles kernels)
        self.result: dict[str, Any] = {
            "benchmark": "bench_gpu_step", "device": self._device_name(),
            "tiny": bool(args.tiny), "dtype": str(self.s.dtype).replace("torch.", ""),
            "shapes": {k: (str(v) if isinstance(v, torch.dtype) else v)
                       for k, v in dataclasses.asdict(self.s).items()},
            "freekv_config": None, "steps_timed": self.steps, "graphs": self.cuda,
            "attention": "own Triton split-KV decode kernel (flash-decoding), every mode",
            "rope": "skipped",
            "synthetic": {"q_bias": args.q_bias, "key_shift": args.key_shift,
                          "drift_rho": args.drift_rho, "jump_prob": args.jump_prob,
                          "seed": args.seed},
            "prefix_sharing": "requests of a batch share their context's host pages (the "
                              "radix-cache path of FreeKVServing); dense reads one copy per "
                              "layer, rotated per request",
            "setup": {}, "rows": [], "checks": {}, "recall": {}, "targets": {}, "log": [],
        }
        self.serving: FreeKVServing | None = None
        self.groups: dict[int, Group] = {}
        self.r2t: torch.Tensor | None = None
        self._next_id = 1  # id 0: the engine's padding id
        self.freekv_error: str | None = None

    # ------------------------------------------------------------------ helpers
    def _device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        return "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.result["log"].append(line)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def new_ids(self, n: int) -> torch.Tensor:
        """``n`` fresh logical token ids (cpu int64; pinned on CUDA)."""
        ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64)
        if self.cuda:
            ids = ids.pin_memory()
        self._next_id += n
        return ids

    def save(self, final: bool = False) -> None:
        name = self.name()
        if final:
            plot = None if self.args.no_png else (lambda: plot_step(self.result))
            try:
                write_results(name, self.result, plot=plot, out_dir=self.args.out_dir)
                return
            except Exception as exc:  # noqa: BLE001 - a plot must not lose the numbers
                self.log(f"plot failed ({type(exc).__name__}: {exc}); JSON only")
        text = json.dumps(self.result, indent=2, default=str) + "\n"
        for folder in output_dirs(self.args.out_dir):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.json").write_text(text)

    def name(self) -> str:
        return f"bench_gpu_step_{self.device.type}" + ("_tiny" if self.args.tiny else "")

    # ------------------------------------------------------------------ phases
    def h2d_peak(self) -> None:
        if not self.cuda:
            self.result["recall"]["h2d_pinned_peak_gbps"] = None
            return
        nbytes = 1 << 30
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        t = time_events(lambda: dev.copy_(host, non_blocking=True), reps=5)
        self.result["recall"]["h2d_pinned_peak_gbps"] = nbytes / t / 1e9
        self.log(f"pinned host->device peak: {nbytes / t / 1e9:.1f} GB/s (1 GiB cudaMemcpyAsync)")

    def build_model(self) -> None:
        t = time.perf_counter()
        self.model = SyntheticModel(self.s, self.device, self.args.seed, self.args.q_bias)
        self.sync()
        self.result["setup"]["weights_gib"] = self.model.weight_bytes / 2**30
        self.result["setup"]["weights_s"] = time.perf_counter() - t
        self.result["checks"]["attention_kernel"] = check_attention(
            self.device, self.s.dtype, self.s.head_dim)
        self.log(f"weights {self.model.weight_bytes / 2**30:.1f} GiB in "
                 f"{time.perf_counter() - t:.1f}s; attention kernel vs fp64: "
                 f"{self.result['checks']['attention_kernel']}")

    def tail(self) -> int:
        per_cfg = self.steps + self.warm + 3
        return self.s.page + 4 * per_cfg + 8  # suffix + freekv/sync x 2 batches

    def build_groups(self) -> None:
        s = self.s
        for i, ctx in enumerate((s.check_context,) + s.contexts):
            t = time.perf_counter()
            bs_max = max(s.batches)
            self.groups[ctx] = Group(s, self.model, ctx, bs_max, self.tail(),
                                     self.steps + self.warm + 3, self.device,
                                     self.args.seed + 1 + i, self.args.key_shift,
                                     self.args.drift_rho, self.args.jump_prob)
            self.sync()
            self.result["setup"][f"dense_kv_{ctx}_gib"] = self.groups[ctx].nbytes / 2**30
            self.log(f"context {ctx}: dense KV {self.groups[ctx].nbytes / 2**30:.2f} GiB "
                     f"in {time.perf_counter() - t:.1f}s")

    def build_serving(self) -> None:
        s, groups = self.s, list(self.groups.values())
        bs_max = max(s.batches)
        cfg = FreeKVConfig(page_size=s.page, budget=s.budget, sink=s.sink, window=s.window)
        self.result["freekv_config"] = cfg.to_dict()
        # one-layer prefill scratch: the largest extend (request 0, or the prefix-sharing
        # requests with their shared prefix read back) plus a page
        scratch = max(max(g.ctx + g.suffix[0], (g.ctx + max(g.suffix)) * (g.bs_max - 1))
                      for g in groups) + s.page
        rows = DeviceRows(budget=s.budget, max_reqs=len(groups) * bs_max, page_size=s.page)
        longest = max(g.ctx for g in groups) + self.tail()
        max_pages = -(-longest // s.page) + 1
        host_pages = sum(g.ctx // s.page + bs_max * (2 + -(-self.tail() // s.page))
                         for g in groups)
        num_ids = sum(g.ctx + sum(g.suffix) for g in groups) + 4 * self.tail() * \
            len(groups) * bs_max + 1
        t = time.perf_counter()
        shape = (rows.buffer_rows, s.kv_heads, s.head_dim)
        kb = [torch.zeros(shape, dtype=s.dtype, device=self.device) for _ in range(s.layers)]
        vb = [torch.zeros(shape, dtype=s.dtype, device=self.device) for _ in range(s.layers)]
        self.sync()
        t_buf = time.perf_counter() - t
        t = time.perf_counter()
        sshape = (scratch, s.kv_heads, s.head_dim)
        self.serving = FreeKVServing(
            cfg, rows, scratch_k=torch.zeros(sshape, dtype=s.dtype, device=self.device),
            scratch_v=torch.zeros(sshape, dtype=s.dtype, device=self.device),
            k_buffers=kb, v_buffers=vb, num_qo_heads=s.qo_heads,
            num_token_ids=num_ids, num_host_pages=host_pages, max_pages_per_req=max_pages,
            max_req_rows=1 + len(groups) * bs_max, decode_step="device", max_bs=bs_max)
        t_init = time.perf_counter() - t
        host = self.serving.cache.host
        self.r2t = torch.zeros((1 + len(groups) * bs_max, max_pages * s.page),
                               dtype=torch.int32, device=self.device)
        self.result["setup"].update({
            "freekv_device_buffers_gib": 2 * s.layers * math.prod(shape) * kb[0].element_size()
            / 2**30, "freekv_device_buffers_s": t_buf,
            "host_tier_gib": host.total_bytes / 2**30, "host_pinned_gib": host.pinned_bytes / 2**30,
            "host_tier_init_s": t_init, "host_pages": host_pages})
        self.log(f"FreeKVServing: host tier {host.total_bytes / 2**30:.2f} GiB "
                 f"({host.pinned_bytes / 2**30:.2f} GiB registered) in {t_init:.1f}s; device "
                 f"buffers {2 * s.layers * math.prod(shape) * kb[0].element_size() / 2**30:.1f}"
                 f" GiB")

    def commit_group(self, grp: Group, first_row: int) -> None:
        """Prefill (staged K/V, no model) and commit: request 0 whole, then requests 1..
        matching its context as a cached prefix (shared host pages) + own suffix."""
        sv, r2t = self.serving, self.r2t
        assert sv is not None and r2t is not None
        grp.rows = [first_row + b for b in range(grp.bs_max)]
        t = time.perf_counter()
        n0 = grp.ctx + grp.suffix[0]
        ids0 = self.new_ids(n0)
        r2t[grp.rows[0], :n0] = ids0.to(self.device, torch.int32)
        step = sv.plan_extend([grp.rows[0]], [n0], [0], ids0.to(self.device), r2t)
        sfx0 = slice(grp.tail_row(1, 0), grp.tail_row(1, 0) + grp.suffix[0])
        for layer in sv.sparse_layers:
            k = torch.cat([grp.k[layer][:grp.ctx], grp.k[layer][sfx0]])
            v = torch.cat([grp.v[layer][:grp.ctx], grp.v[layer][sfx0]])
            sv.begin_extend_layer(layer, step, k, v)
            sv.end_extend_layer(layer, step)
        sv.commit_extend(step)
        self.sync()
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        rest = grp.rows[1:]
        if rest:
            own = []
            for b, row in enumerate(rest, start=1):
                mine = self.new_ids(grp.suffix[b])
                r2t[row, :grp.ctx] = r2t[grp.rows[0], :grp.ctx]
                r2t[row, grp.ctx:grp.ctx + grp.suffix[b]] = mine.to(self.device, torch.int32)
                own.append(mine)
            lens = [grp.ctx + grp.suffix[b] for b in range(1, grp.bs_max)]
            step = sv.plan_extend(rest, lens, [grp.ctx] * len(rest),
                                  torch.cat(own).to(self.device), r2t)
            for layer in sv.sparse_layers:
                k = torch.cat([grp.k[layer][grp.tail_row(1, b):grp.tail_row(1, b) + grp.suffix[b]]
                               for b in range(1, grp.bs_max)])
                v = torch.cat([grp.v[layer][grp.tail_row(1, b):grp.tail_row(1, b) + grp.suffix[b]]
                               for b in range(1, grp.bs_max)])
                sv.begin_extend_layer(layer, step, k, v)
                sv.end_extend_layer(layer, step)
            sv.commit_extend(step)
        self.sync()
        t_rest = time.perf_counter() - t
        grp.n = [grp.ctx + grp.suffix[b] for b in range(grp.bs_max)]
        self.result["setup"][f"commit_{grp.ctx}_s"] = {"first": t_first, "prefix_shared": t_rest}
        self.log(f"context {grp.ctx}: committed request 0 in {t_first:.1f}s, {len(rest)} "
                 f"prefix-sharing requests in {t_rest:.1f}s (host pages used "
                 f"{sv.cache.host.used_pages})")

    def recall_bench(self, grp: Group) -> None:
        """recall_direct from the mapped host tier: block lists of a few sizes (a step's
        per-layer recalls are small), GB/s of K+V payload, and a correctness spot check."""
        sv = self.serving
        assert sv is not None
        s, host = self.s, sv.cache.host
        sizes = (256, 1024, 4096) if self.cuda else (16,)
        pages = sv.cache.t.host_pages_cpu[grp.rows[0], :grp.ctx // s.page].to(torch.int64)
        gen = torch.Generator().manual_seed(3)
        n_max = max(sizes)
        ids = pages[torch.randint(pages.numel(), (n_max,), generator=gen)].to(self.device)
        heads = (torch.arange(n_max) % s.kv_heads).to(self.device, torch.int32)
        dst = ((torch.arange(n_max) // s.kv_heads) * s.page).to(self.device)
        kb = torch.empty((-(-n_max // s.kv_heads) * s.page, s.kv_heads, s.head_dim),
                         dtype=s.dtype, device=self.device)
        vb = torch.empty_like(kb)
        layer = sv.sparse_layers[0]
        block = sv.cache.recall.block_bytes
        by_size: dict[str, float] = {}
        ok = True
        for n in sizes:
            nv = torch.tensor([n], device=self.device)

            def go(nv: torch.Tensor = nv, n: int = n) -> None:
                recall_direct(host.kv[layer], ids[:n], heads[:n], dst[:n], nv, kb, vb)

            go()
            self.sync()
            for i in (0, n // 2, n - 1):  # blocks equal the host tier
                blk = host.kv[layer, int(ids[i]), int(heads[i])]  # [2, P, D] host
                ok &= bool(torch.equal(kb[int(dst[i]):int(dst[i]) + s.page, int(heads[i])].cpu(),
                                       blk[0]))
                ok &= bool(torch.equal(vb[int(dst[i]):int(dst[i]) + s.page, int(heads[i])].cpu(),
                                       blk[1]))
            t = time_events(go, reps=10) if self.cuda else time_wall(go, reps=1)
            by_size[str(n)] = n * block / t / 1e9
        gbps = by_size[str(n_max)]
        peak = self.result["recall"].get("h2d_pinned_peak_gbps")
        self.result["recall"].update({
            "recall_direct_blocks": n_max, "block_bytes": block, "recall_direct_gbps": gbps,
            "recall_direct_gbps_by_blocks": by_size, "recall_direct_correct": ok,
            "recall_vs_peak": (gbps / peak) if peak else None})
        self.log(f"recall_direct ({block} B blocks): "
                 + ", ".join(f"{n} blocks {v:.1f} GB/s" for n, v in by_size.items())
                 + (f"; {gbps / peak:.2f} of the pinned peak" if peak else "")
                 + f"; blocks equal the host tier: {ok}")

    # ------------------------------------------------------------------ configs
    def run_config(self, mode: str, ctx: int, bs: int, *, timed: bool = True,
                   keep_logits: bool = False, eager_steps: int = 0) -> dict[str, Any]:
        row: dict[str, Any] = {"mode": mode, "context": ctx, "batch": bs}
        t_start = time.perf_counter()
        if mode == "dense":
            grp = self.groups[ctx] if ctx in self.groups else self.groups[self.s.contexts[0]]
            runner: Any = DenseRunner(self.model, grp, bs, ctx)
        else:
            grp = self.groups[ctx]
            assert self.serving is not None
            _set_speculative(self.serving, mode == "freekv")
            runner = FreeKVRunner(self.model, grp, bs, self)
            stats0 = self.serving.stats()
        logits: list[torch.Tensor] = []
        out = None
        for _ in range(eager_steps or self.warm):  # eager: compiles the kernels
            runner.plan()
            out = runner.forward()
            if keep_logits:
                logits.append(out.clone())
        self.sync()
        if not timed:
            row["logits"] = logits
            return row
        graph = None
        if self.cuda:
            runner.plan()
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = runner.forward()
                graph.replay()  # runs the step planned for the capture
            except Exception as exc:  # noqa: BLE001 - time it eagerly instead, say so
                row["capture_error"] = f"{type(exc).__name__}: {exc}"[:800]
                self.log(f"{mode} ctx {ctx} bs {bs}: CUDA graph capture FAILED "
                         f"({row['capture_error']}); timing eager steps")
                graph = None
                out = runner.forward()  # the step planned for the capture
            self.sync()
            row["capture_s"] = time.perf_counter() - t_start
        row["graph"] = graph is not None
        row["graph_check"] = self._check_replay(runner, graph, out)
        if mode != "dense":
            stats1 = self.serving.stats()
        # timed steps
        plan_s, ends = [], []
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            a = time.perf_counter()
            runner.plan()
            plan_s.append(time.perf_counter() - a)
            if graph is not None:
                graph.replay()
            else:
                runner.forward()
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                ends.append(ev)
        self.sync()
        wall = (time.perf_counter() - t0) / self.steps
        row.update({"tpot_ms": wall * 1e3, "tok_s": bs / wall,
                    "plan_ms": sorted(plan_s)[len(plan_s) // 2] * 1e3})
        if len(ends) > 1:
            gaps = sorted(a.elapsed_time(b) for a, b in itertools.pairwise(ends))
            row["gpu_step_ms"] = gaps[len(gaps) // 2]
        if mode != "dense":
            stats2 = self.serving.stats()
            row.update(self._recall_stats(mode, bs, stats0, stats1, stats2, wall))
        row["config_s"] = time.perf_counter() - t_start
        del graph
        return row

    def _check_replay(self, runner: Any, graph: Any, out: torch.Tensor | None) -> dict:
        """One step eagerly, then the same step (restored state) as a replay."""
        runner.plan()
        snap = runner.snapshot()
        eager = runner.forward().clone()
        res_e = self.serving.cache.residency.clone() if isinstance(runner, FreeKVRunner) else None
        runner.restore(snap)
        if graph is not None:
            graph.replay()
            again = out
        else:  # CPU: a second eager run from the restored state
            again = runner.forward()
        self.sync()
        diff = float((again - eager).abs().max())
        scale = float(eager.abs().max())
        res: dict[str, Any] = {"graph": graph is not None, "max_abs_diff": diff,
                               "max_abs_logit": scale, "bitwise": diff == 0.0,
                               "tokens_equal": bool(torch.equal(again.argmax(-1),
                                                                eager.argmax(-1)))}
        if res_e is not None:
            res["residency_equal"] = bool(torch.equal(res_e, self.serving.cache.residency))
        res["ok"] = bool(res["tokens_equal"] and diff <= 1e-3 * max(scale, 1.0)
                         and res.get("residency_equal", True))
        del snap
        return res

    def _recall_stats(self, mode: str, bs: int, s0: dict, s1: dict, s2: dict,
                      wall: float) -> dict[str, Any]:
        s = self.s
        sv = self.serving
        k = sv.cache.cfg.top_k
        n_sparse = len(sv.sparse_layers)
        blocks = (s2["recalled_pages"] - s1["recalled_pages"]) / self.steps
        checked = s2["checked_heads"] - s0["checked_heads"]
        corrected = s2["corrected_heads"] - s0["corrected_heads"]
        out = {
            "recall_blocks_total": s2["recalled_pages"] - s0["recalled_pages"],
            "recall_blocks_per_step": blocks,
            "recall_mb_per_step": blocks * sv.cache.recall.block_bytes / 1e6,
            "recall_demand_gbps": blocks * sv.cache.recall.block_bytes / wall / 1e9,
            "turnover": blocks / (bs * s.kv_heads * k * n_sparse),
            "drift_checked_heads": checked, "corrected_frac": corrected / checked if checked
            else None,
        }
        # the sync baseline checks no drift; the speculative step does (tau set)
        out["mode_verified"] = (checked == 0) if mode == "sync" else (checked > 0)
        return out

    # ------------------------------------------------------------------ plan of the run
    def add_row(self, row: dict[str, Any]) -> None:
        row.pop("logits", None)
        self.result["rows"].append(row)
        self.save()

    def try_config(self, mode: str, ctx: int, bs: int, need_s: float) -> None:
        tag = f"{mode} ctx {ctx} bs {bs}"
        if mode != "dense" and self.freekv_error:
            self.add_row({"mode": mode, "context": ctx, "batch": bs,
                          "skipped": f"FreeKV unavailable: {self.freekv_error}"})
            return
        if self.time_left() < need_s:
            self.add_row({"mode": mode, "context": ctx, "batch": bs,
                          "skipped": f"time budget ({self.time_left():.0f}s left, ~{need_s:.0f}s "
                                     "needed)"})
            self.log(f"{tag}: skipped (time budget)")
            return
        try:
            row = self.run_config(mode, ctx, bs)
        except Exception as exc:  # noqa: BLE001 - report and keep going
            row = {"mode": mode, "context": ctx, "batch": bs,
                   "error": f"{type(exc).__name__}: {exc}"[:800],
                   "traceback": traceback.format_exc()[-2000:]}
            self.log(f"{tag}: FAILED {row['error']}")
            self.add_row(row)
            return
        gc = row.get("graph_check", {})
        self.log(f"{tag}: tpot {row['tpot_ms']:.3f} ms"
                 + (f", gpu {row['gpu_step_ms']:.3f} ms" if "gpu_step_ms" in row else "")
                 + f", plan {row['plan_ms']:.2f} ms, graph==eager {gc.get('ok')}"
                 + (f", recall {row['recall_blocks_per_step']:.0f} blk/step, turnover "
                    f"{row['turnover']:.2f}, corrected {row['corrected_frac']}"
                    if mode != "dense" else ""))
        self.add_row(row)

    def full_budget_check(self) -> None:
        """Budget >= context: FreeKV's logits equal dense's (same inputs, eager)."""
        s = self.s
        ctx, bs = s.check_context, max(s.batches)
        n = 3
        dense = self.run_config("dense", ctx, bs, timed=False, keep_logits=True,
                                eager_steps=n)["logits"]
        fkv = self.run_config("freekv", ctx, bs, timed=False, keep_logits=True,
                              eager_steps=n)["logits"]
        a, b = torch.stack(fkv), torch.stack(dense)
        rel = float((a - b).norm() / b.norm())
        tol = 1e-4 if s.dtype == torch.float32 else 2e-2
        tok = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        self.result["checks"]["freekv_equals_dense_full_budget"] = {
            "context": ctx, "batch": bs, "steps": len(fkv), "rel_err": rel, "tol": tol,
            "token_agreement": tok, "ok": bool(rel <= tol)}
        self.log(f"full budget (context {ctx}, batch {bs}): freekv vs dense logits rel err "
                 f"{rel:.2e} (tol {tol:g}), tokens agree {tok:.2f}")

    def _guarded(self, section: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - report and keep going
            err = f"{type(exc).__name__}: {exc}"[:800]
            self.result[section]["error"] = err
            self.result[section]["traceback"] = traceback.format_exc()[-2000:]
            self.log(f"{section} FAILED: {err}")

    def run(self) -> dict[str, Any]:
        s = self.s
        self.h2d_peak()
        self.build_model()
        self.build_groups()
        bmax, bmin = max(s.batches), min(s.batches)
        big, small = max(s.contexts), min(s.contexts)
        # Dense first: a FreeKV failure that poisons the CUDA context cannot lose them.
        for ctx in (s.short_context,) + s.contexts:
            for bs in sorted(s.batches, reverse=True):
                self.try_config("dense", ctx, bs, need_s=8)
        try:
            self.build_serving()
            for i, grp in enumerate(self.groups.values()):
                if self.time_left() < (40 if grp.ctx >= big and self.cuda else 10):
                    raise RuntimeError(f"time budget: no time to commit context {grp.ctx}")
                self.commit_group(grp, first_row=1 + i * grp.bs_max)
        except Exception as exc:  # noqa: BLE001
            self.freekv_error = f"{type(exc).__name__}: {exc}"[:800]
            self.result["setup"]["freekv_error"] = self.freekv_error
            self.result["setup"]["freekv_traceback"] = traceback.format_exc()[-2000:]
            self.log(f"FreeKV set-up FAILED: {self.freekv_error}")
        if self.freekv_error is None:
            # the first reads of the mapped host tier by address (recall_direct): a failure
            # here (e.g. Triton refusing a host pointer) is reported and the run goes on
            self._guarded("recall", lambda: self.recall_bench(self.groups[big]))
            self._guarded("checks", self.full_budget_check)
        self.save()
        order = [("freekv", small, bmax), ("freekv", big, bmax), ("sync", big, bmax),
                 ("sync", small, bmax), ("freekv", big, bmin), ("freekv", small, bmin),
                 ("sync", big, bmin), ("sync", small, bmin)]
        for mode, ctx, bs in dict.fromkeys(order):  # --quick: duplicates collapse
            self.try_config(mode, ctx, bs, need_s=15 if self.cuda else 2)
        self.targets()
        self.result["total_s"] = self.elapsed()
        self.save(final=True)
        return self.result

    def targets(self) -> None:
        s = self.s
        rows = {(r["mode"], r["context"], r["batch"]): r for r in self.result["rows"]
                if "tpot_ms" in r}
        big = max(s.contexts)
        out: dict[str, Any] = {}
        for bs in s.batches:
            f, d = rows.get(("freekv", big, bs)), rows.get(("dense", s.short_context, bs))
            key = f"freekv_{big}_vs_dense_{s.short_context}_bs{bs}"
            if f and d:
                ratio = f["tpot_ms"] / d["tpot_ms"]
                out[key] = {"ratio": ratio, "target": "<= 1.15", "met": ratio <= 1.15}
            else:
                out[key] = {"ratio": None, "met": None, "note": "not measured"}
        f, y = rows.get(("freekv", big, max(s.batches))), rows.get(("sync", big, max(s.batches)))
        key = f"sync_over_freekv_{big}_bs{max(s.batches)}"
        if f and y:
            sp = y["tpot_ms"] / f["tpot_ms"]
            out[key] = {"speedup": sp, "target": ">= 5", "met": sp >= 5}
        else:
            out[key] = {"speedup": None, "met": None, "note": "not measured"}
        self.result["targets"] = out
        for k, v in out.items():
            self.log(f"target {k}: {v}")


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU dry run)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per config "
                    "(default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="seconds; configs that no longer fit are skipped (reported)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="one context (the longest) and one batch (the largest): the test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--q-bias", type=float, default=0.5)
    ap.add_argument("--key-shift", type=float, default=0.05)
    ap.add_argument("--drift-rho", type=float, default=0.95)
    ap.add_argument("--jump-prob", type=float, default=0.15)
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench_gpu_step: the Llama-3.1-8B shapes need CUDA; use --tiny on CPU")
        return 2
    torch.manual_seed(args.seed)
    bench = Bench(args)
    bench.log(f"bench_gpu_step on {bench.result['device']}, budget {args.time_budget:.0f}s")
    try:
        bench.run()
    except Exception as exc:  # noqa: BLE001 - keep what was measured
        bench.result["fatal"] = f"{type(exc).__name__}: {exc}"
        bench.result["fatal_traceback"] = traceback.format_exc()[-3000:]
        bench.log(f"FATAL: {bench.result['fatal']}")
        bench.save()
        return 1
    print_table(bench.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
