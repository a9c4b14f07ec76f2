"""FreeKVServing without a server: prefill scratch, activation, decode tables, release,
prefix sharing, chunked prefill.

An engine stand-in hands out logical token ids like SGLang's allocator (``req_to_token``
rows, freed ids back to a free list) and keeps the dense truth of every token's K/V, so
every test checks both the accounting (host pages, budget chunks, page references) and the
data the attention backend will read.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest
import torch

import sglang_freekv.serving.core as core_mod
from sglang_freekv.serving import DeviceRows, FreeKVServing, FreeKVStagingFull
from sglang_freekv.serving.rows import BudgetSlots

from .conftest import make_cfg

P, H, HQ, D, L = 4, 2, 4, 8, 3  # page, KV heads, q heads, head dim, layers (layer 0 dense)
NUM_IDS, MAX_ROWS, CTX = 512, 6, 160


class Engine:
    """Logical ids, request rows and the dense truth of every token's K/V."""

    def __init__(self, *, k: int = 2, staging: int = 96, keep_partial: bool = True,
                 evict: bool = False, host_pages: int = 64, decode_step: str = "host",
                 tau: float | None = 0.8, max_reqs: int = 3) -> None:
        self.cfg = make_cfg(P, k=k, sink=1, window=2, tau=tau)
        self.rows = DeviceRows(budget=self.cfg.budget, max_reqs=max_reqs, page_size=P)
        shape_sparse = (self.rows.buffer_rows, H, D)
        shapes = [(NUM_IDS, H, D)] + [shape_sparse] * (L - 1)
        self.kb = [torch.zeros(s) for s in shapes]
        self.vb = [torch.zeros(s) for s in shapes]
        self.sk = torch.zeros(staging + P, H, D)  # the one-layer prefill scratch
        self.sv = torch.zeros(staging + P, H, D)
        self.evicted: list[int] = []
        self.serving = FreeKVServing(
            self.cfg, self.rows, scratch_k=self.sk, scratch_v=self.sv,
            k_buffers=self.kb, v_buffers=self.vb, num_qo_heads=HQ,
            num_token_ids=NUM_IDS, num_host_pages=host_pages, max_pages_per_req=CTX // P,
            max_req_rows=MAX_ROWS, keep_partial_pages=keep_partial,
            evict=self._evict if evict else None, decode_step=decode_step)
        self.r2t = torch.zeros((MAX_ROWS, CTX), dtype=torch.int32)
        self.free_ids = list(range(NUM_IDS - 1, 0, -1))  # id 0 is SGLang's padding id
        self.truth_k = torch.randn(L, NUM_IDS, H, D)
        self.truth_v = torch.randn(L, NUM_IDS, H, D)
        self.lens: dict[int, int] = {}
        self.cached: list[int] = []  # ids a "radix cache" keeps after a request ends
        self.bases: dict[int, torch.Tensor] = {}  # per request: query base [L, HQ, D]

    def _evict(self, num_tokens: int) -> int:
        n = min(num_tokens, len(self.cached))
        ids, self.cached = self.cached[:n], self.cached[n:]
        self.free(torch.tensor(ids, dtype=torch.int64))
        self.evicted.append(n)
        return n

    def free(self, ids: torch.Tensor) -> None:
        self.serving.free_token_ids(ids)
        self.free_ids.extend(int(i) for i in ids)

    def alloc(self, n: int) -> torch.Tensor:
        return torch.tensor([self.free_ids.pop() for _ in range(n)], dtype=torch.int64)

    def extend(self, rows: list[int], lens: list[int],
               prefixes: list[list[int]] | None = None, new_lens: list[int] | None = None):
        """One extend forward of ``rows`` up to ``lens`` tokens (``prefixes``: cached or
        earlier-chunk ids; the rest are new ids), through every sparse layer, checking the
        scratch holds every position's dense truth before attention. Not committed."""
        prefixes = prefixes or [[] for _ in rows]
        out = []
        for row, n, pre in zip(rows, lens, prefixes):
            new = self.alloc(n - len(pre))
            ids = torch.cat([torch.tensor(pre, dtype=torch.int64), new])
            self.r2t[row, :n] = ids.to(torch.int32)
            out.append(new)
            self.lens[row] = n
        out_loc = torch.cat(out)
        step = self.serving.plan_extend(rows, lens, [len(p) for p in prefixes], out_loc,
                                        self.r2t)
        for layer in range(1, L):
            self.serving.begin_extend_layer(layer, step, self.truth_k[layer, out_loc],
                                            self.truth_v[layer, out_loc])
            for b in range(len(rows)):
                self.scratch_truth(step, layer, b)
            self.serving.end_extend_layer(layer, step)
        return step

    def prefill(self, rows: list[int], lens: list[int],
                prefixes: list[list[int]] | None = None):
        step = self.extend(rows, lens, prefixes)
        self.serving.commit_extend(step)
        return step

    def decode(self, rows: list[int], guard: Any = None, outputs: list | None = None,
               q_noise: float = 0.3):
        """One decode step of ``rows``; ``guard``: a context manager entered around the
        step's per-layer work; ``outputs``: gets each sparse layer's attention output over
        the budget table. Queries drift around a per-request base (some heads corrected)."""
        n = [self.lens[r] + 1 for r in rows]
        loc = self.alloc(len(rows))
        for r, nn, i in zip(rows, n, loc.tolist()):
            self.r2t[r, nn - 1] = i
            self.lens[r] = nn
        rows_t, n_t = torch.tensor(rows), torch.tensor(n)
        plan = self.serving.plan_decode(rows_t, n_t, rows_t, n_t, loc, self.r2t)
        base = torch.stack([self._base(r) for r in rows])  # [bs, L, HQ, D]
        qs = [base[:, layer] + q_noise * torch.randn(len(rows), HQ, D) for layer in range(L)]
        kv = [(self.truth_k[layer, loc], self.truth_v[layer, loc]) for layer in range(L)]
        with guard if guard is not None else contextlib.nullcontext():
            for layer in range(1, L):
                q = qs[layer]
                self.serving.begin_decode_layer(layer, plan, q, *kv[layer])
                if outputs is not None:
                    outputs.append(_budget_attention(q, self.kb[layer], self.vb[layer],
                                                     plan.kv_table, plan.kv_lens))
                self.serving.end_decode_layer(layer, plan, q)
        return plan

    def _base(self, row: int) -> torch.Tensor:
        if row not in self.bases:
            self.bases[row] = torch.randn(L, HQ, D)
        return self.bases[row]

    def finish(self, row: int, cache_ids: bool) -> None:
        ids = self.r2t[row, :self.lens[row]].to(torch.int64)
        self.serving.release_rows([row])
        self.bases.pop(row, None)
        if cache_ids:
            self.cached.extend(ids.tolist())
        else:
            self.free(ids)
        del self.lens[row]

    def scratch_truth(self, step, layer: int, b: int) -> None:
        """The scratch rows of batch position ``b`` hold the request's K/V in order (the
        prefix read back from the host tier, the new tokens as written)."""
        n = step.seq_lens[b]
        rows = step.table[b, :n].to(torch.int64)
        ids = self.r2t[step.req_rows[b], :n].to(torch.int64)
        assert torch.equal(self.sk[rows], self.truth_k[layer, ids]), f"layer {layer} b {b}"
        assert torch.equal(self.sv[rows], self.truth_v[layer, ids])


def _budget_attention(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                      table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Attention of ``q [bs, HQ, D]`` over each request's first ``lens[b]`` table rows,
    without host syncs (padded to the table width with a mask), fp32."""
    bs, width = table.shape
    rows = table.to(torch.int64)  # [bs, width]
    k, v = kb[rows].float(), vb[rows].float()  # [bs, width, H, D]
    qf = q.float().view(bs, H, HQ // H, D)
    s = torch.einsum("bhgd,bwhd->bhgw", qf, k) * D**-0.5
    mask = torch.arange(width)[None, :] < lens.to(torch.int64)[:, None]  # [bs, width]
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgw,bwhd->bhgd", torch.softmax(s, dim=-1), v)
    return o.reshape(bs, HQ, D)


def _idle(e: Engine) -> None:
    s = e.serving
    assert s.slots.used == 0 and not s.committed and not s.prefilled and not s.own_pages


def test_prefill_writes_through_and_activation_fills_the_slots() -> None:
    e = Engine()
    s = e.serving
    step = e.extend([1, 3], [13, 30])  # the scratch holds both prompts (checked per layer)
    assert len(set(step.out_rows.tolist())) == 43 and int(step.out_rows.max()) < 43
    assert s.cache.host.used_pages == 4 + 8  # ceil(13/4) + ceil(30/4), allocated at plan
    s.commit_extend(step)
    assert s.prefilled == {1: 13, 3: 30} and not s.committed and s.slots.used == 0
    assert s.tokens.num_mapped == 43
    for layer in (1, 2):  # every prompt token is on the host tier
        for row, n in ((1, 13), (3, 30)):
            ids = e.r2t[row, :n].to(torch.int64)
            k, v = s.cache.load_tokens(layer, s.tokens.slots_of(ids))
            assert torch.equal(k, e.truth_k[layer, ids]) and torch.equal(v, e.truth_v[layer, ids])
    with pytest.raises(RuntimeError, match="generic path"):
        s.translate(e.r2t[1, :2])
    e.decode([1, 3])  # first decode step: both activated from the host tier
    assert s.slots.used == 2 and set(s.committed) == {1, 3} and not s.prefilled
    assert s.usage().device_pages == 2 * e.cfg.budget_pages


def test_decode_tables_read_the_dense_truth_in_the_dense_regime() -> None:
    """Budget >= context: the table's first kv_lens rows are every token in order."""
    e = Engine(k=4)  # budget 7 pages = 28 tokens
    s = e.serving
    e.prefill([0, 2], [9, 17])
    for _ in range(6):
        plan = e.decode([0, 2])
        assert plan.kv_table.shape == (2, e.cfg.budget) and plan.kv_table.dtype == torch.int32
        assert plan.kv_lens_cpu.tolist() == [e.lens[0], e.lens[2]]
        for b, row in enumerate([0, 2]):
            n = e.lens[row]
            rows = plan.kv_table[b, :n].to(torch.int64)
            ids = e.r2t[row, :n].to(torch.int64)
            for layer in (1, 2):
                assert torch.equal(e.kb[layer][rows], e.truth_k[layer, ids])
                assert torch.equal(e.vb[layer][rows], e.truth_v[layer, ids])
    assert s.tokens.num_mapped == e.lens[0] + e.lens[2]


def test_release_returns_everything_and_cached_ids_hold_pages() -> None:
    e = Engine()
    s = e.serving
    e.prefill([1, 4], [11, 26])
    for _ in range(7):
        e.decode([1, 4])
    e.finish(1, cache_ids=True)  # a radix cache keeps row 1's ids
    e.finish(4, cache_ids=False)
    u = s.usage()
    assert u.host_pages_in_flight == 0 and u.device_pages == 0
    assert u.host_pages_cached == -(-18 // P)  # row 1: 11 + 7 tokens
    assert s.cache.host.used_pages == u.host_pages_cached
    # the partial last page was written to the host tier: every cached id reads back
    ids = torch.tensor(e.cached)
    slots = s.tokens.slots_of(ids)
    for layer in (1, 2):
        k, _ = s.cache.load_tokens(layer, slots)
        assert torch.equal(k, e.truth_k[layer, ids])
    e.free(torch.tensor(e.cached))
    e.cached = []
    assert s.cache.host.used_pages == 0
    _idle(e)


def test_abort_mid_prefill_and_retraction() -> None:
    e = Engine()
    s = e.serving
    e.extend([2], [21])
    s.release_rows([2])  # aborted during its prefill forward: its pages come back
    e.free(e.r2t[2, :21].to(torch.int64))
    _idle(e)
    assert s.cache.host.used_pages == 0
    e.prefill([3], [15])
    s.release_rows([3])  # aborted between prefill and its first decode step
    e.free(e.r2t[3, :15].to(torch.int64))
    assert s.cache.host.used_pages == 0
    e.prefill([3], [15])
    e.decode([3])
    s.release_rows([3])  # retracted: SGLang frees its ids and re-prefills it later
    e.free(e.r2t[3, :16].to(torch.int64))
    assert s.cache.host.used_pages == 0
    e.prefill([3], [16])
    e.decode([3])
    assert s.slots.used == 1 and s.cache.host.used_pages == 5
    e.finish(3, cache_ids=False)
    _idle(e)
    assert s.cache.host.used_pages == 0


def test_chunked_prefill_equals_the_whole_prompt() -> None:
    """A prompt prefilled in three chunks (each reading its prefix back from the host tier)
    leaves the same host pages, digests and budget slots as the whole prompt at once."""
    whole, chunked = Engine(), Engine()
    for e in (whole, chunked):  # the same truth, the same ids
        e.truth_k, e.truth_v = whole.truth_k, whole.truth_v
    whole.prefill([2], [37])
    chunked.prefill([2], [10])
    chunked.prefill([2], [23], prefixes=[chunked.r2t[2, :10].tolist()])
    chunked.prefill([2], [37], prefixes=[chunked.r2t[2, :23].tolist()])
    assert torch.equal(whole.r2t[2, :37], chunked.r2t[2, :37])
    for e in (whole, chunked):
        torch.manual_seed(1)  # the same queries
        e.decode([2])
        e.serving.cache.recall.wait_all()
    sw, sc = whole.serving, chunked.serving
    pw = sw.cache.t.host_pages_cpu[2, :10].to(torch.int64)
    pc = sc.cache.t.host_pages_cpu[2, :10].to(torch.int64)
    assert sw.cache.host.used_pages == sc.cache.host.used_pages == 10
    for layer in (1, 2):
        hw, hc = sw.cache.host.kv[layer][pw], sc.cache.host.kv[layer][pc]
        assert torch.equal(hw[:9], hc[:9])  # the 9 full pages (the 10th is partial)
        assert torch.equal(hw[9, :, :, :2], hc[9, :, :, :2])  # 38 tokens: 2 in page 9
        assert torch.equal(sw.cache.digests[layer][pw[:9]], sc.cache.digests[layer][pc[:9]])
        rw = whole.kb[layer][:sw.rows.budget_rows]
        rc = chunked.kb[layer][:sc.rows.budget_rows]
        assert torch.equal(rw, rc)  # the budget slots after activation and one step


def test_prefix_sharing_reads_the_host_and_shares_full_pages() -> None:
    e = Engine()
    s = e.serving
    e.prefill([0], [22])
    e.decode([0])
    prefix = e.r2t[0, :14].to(torch.int64).tolist()  # 3 full pages + 2 tokens
    e.finish(0, cache_ids=True)
    cached_pages = s.cache.host.used_pages
    step = e.extend([5], [30], prefixes=[prefix])  # prefix read back into the scratch
    assert step.prefix_rows.numel() == 14
    s.commit_extend(step)
    shared = s.cache.t.host_pages_cpu[5, :3].to(torch.int64)
    assert bool((s.cache.host.refs(shared) >= 2).all())  # row 5 + cached ids
    assert s.cache.host.used_pages == cached_pages + -(-30 // P) - 3
    e.finish(5, cache_ids=False)
    e.free(torch.tensor(e.cached))
    e.cached = []
    assert s.cache.host.used_pages == 0
    _idle(e)


def test_after_checkpoint_moves_duplicate_pages_to_the_cached_copy() -> None:
    e = Engine()
    s = e.serving
    e.prefill([0], [16])
    e.prefill([1], [16])
    e.decode([0, 1])  # both running: row 1's ids get deduplicated while it runs
    # the radix cache finds row 1's prompt equal to row 0's: it swaps row 1's ids for row
    # 0's cached ids and frees its own
    own = e.r2t[1, :16].to(torch.int64)
    e.r2t[1, :16] = e.r2t[0, :16]
    e.free(own)
    before = s.cache.host.used_pages
    s.after_checkpoint(1, e.r2t)
    assert torch.equal(s.cache.t.host_pages_cpu[1, :4], s.cache.t.host_pages_cpu[0, :4])
    assert s.cache.host.used_pages == before - 4
    e.lens[1] = e.lens[0]  # (its ids are now row 0's)
    e.finish(1, cache_ids=False)
    e.finish(0, cache_ids=False)
    assert s.cache.host.used_pages == 0


def test_host_tier_full_asks_the_prefix_cache_to_evict() -> None:
    e = Engine(evict=True, host_pages=10)
    s = e.serving
    e.prefill([0], [30])  # 8 pages
    e.finish(0, cache_ids=True)
    assert s.cache.host.used_pages == 8
    e.prefill([1], [20])  # 5 pages: 3 must be evicted
    assert e.evicted and s.cache.host.used_pages <= 10
    e.finish(1, cache_ids=False)


def test_scratch_too_small_is_a_clear_error_and_leaks_nothing() -> None:
    e = Engine(staging=16)
    with pytest.raises(FreeKVStagingFull, match="the prefill scratch holds 16 tokens"):
        e.extend([0], [20])
    _idle(e)
    assert e.serving.cache.host.used_pages == 0


def test_budget_slots_refuse_double_release() -> None:
    slots = BudgetSlots(2, 8)
    a, b = slots.alloc(), slots.alloc()
    assert (a, b, slots.alloc()) == (0, 8, None)
    slots.release(8)
    with pytest.raises(ValueError, match="already free"):
        slots.release(8)
    with pytest.raises(ValueError, match="not a chunk start"):
        slots.release(3)


def test_an_extend_waits_the_speculative_job_of_the_last_decode_step() -> None:
    """Ordering: the step job of decode step t runs on the worker; the next forward is an
    extend of another request (a sibling prefilled next to a decoding request). The extend's
    planning starts only after that job ended, so no extend overlaps a job's host-tier reads
    (the wrong K/V once blamed on that overlap was race 10, tests/core/test_races.py). Forced
    order: the job is held at its start until the extend has either planned (no wait) or is
    waiting the job."""
    e = Engine()
    s = e.serving
    e.prefill([1], [40])  # 10 pages: sparse (budget 5 pages)
    e.decode([1])  # first step: activation, job for the next step
    e.decode([1])  # a step served by a job; submits the next one
    s.cache.recall.wait_all()
    events: list[str] = []
    gate, reached = threading.Event(), threading.Condition()

    def hold(point: str) -> None:
        if point == "job_start":
            assert gate.wait(timeout=60), "the test never opened the gate"

    def note(name: str) -> None:
        with reached:
            events.append(name)
            reached.notify_all()

    cache = s.cache
    wait_jobs = cache.wait_jobs
    cache.recall._checkpoint = hold  # type: ignore[method-assign]

    def waiting() -> None:
        note("extend waits")
        wait_jobs()

    cache.wait_jobs = waiting  # type: ignore[method-assign]
    plan_step = core_mod.plan_extend_step

    def planned(*args: Any, **kwargs: Any) -> Any:
        note("extend plans")
        return plan_step(*args, **kwargs)

    core_mod.plan_extend_step = planned  # type: ignore[assignment]
    try:
        e.decode([1])  # submits a job, held at its start
        job = next(iter(s.cache._jobs.values()))
        job.add_done_callback(lambda _: note("job done"))
        t = threading.Thread(target=lambda: e.extend([2], [12]))
        t.start()
        with reached:
            assert reached.wait_for(lambda: events, timeout=60)
        gate.set()
        t.join(timeout=60)
        assert not t.is_alive()
    finally:
        gate.set()
        core_mod.plan_extend_step = plan_step  # type: ignore[assignment]
        cache.wait_jobs = wait_jobs  # type: ignore[method-assign]
    assert events.index("job done") < events.index("extend plans"), events
