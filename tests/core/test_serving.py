"""FreeKVServing without a server: staging, commit, decode tables, release, prefix sharing.

An engine stand-in hands out logical token ids like SGLang's allocator (``req_to_token``
rows, freed ids back to a free list) and keeps the dense truth of every token's K/V, so
every test checks both the accounting (host pages, budget chunks, staging rows, page
references, ``loc_map``) and the data the attention backend will read.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from sglang_freekv.serving import DeviceRows, FreeKVServing, FreeKVStagingFull
from sglang_freekv.serving.rows import BudgetSlots, StagingRows

from .conftest import make_cfg

P, H, HQ, D, L = 4, 2, 4, 8, 3  # page, KV heads, q heads, head dim, layers (layer 0 dense)
NUM_IDS, MAX_ROWS, CTX = 512, 6, 160


class Engine:
    """Logical ids, request rows and the dense truth of every token's K/V."""

    def __init__(self, *, k: int = 2, staging: int = 96, keep_partial: bool = True,
                 evict: bool = False, host_pages: int = 64, decode_step: str = "host",
                 tau: float | None = 0.8, max_reqs: int = 3) -> None:
        self.cfg = make_cfg(P, k=k, sink=1, window=2, tau=tau)
        self.rows = DeviceRows(budget=self.cfg.budget, max_reqs=max_reqs, staging_rows=staging,
                               page_size=P)
        shape_sparse = (self.rows.buffer_rows, H, D)
        shapes = [(NUM_IDS, H, D)] + [shape_sparse] * (L - 1)
        self.kb = [torch.zeros(s) for s in shapes]
        self.vb = [torch.zeros(s) for s in shapes]
        self.evicted: list[int] = []
        self.serving = FreeKVServing(
            self.cfg, self.rows, k_buffers=self.kb, v_buffers=self.vb, num_qo_heads=HQ,
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

    def extend(self, rows: list[int], lens: list[int], prefixes: list[list[int]] | None = None):
        """Prefill ``rows`` (new prompts of ``lens`` tokens; optional cached prefix ids)."""
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
            self.serving.write_extend(layer, step, self.truth_k[layer, out_loc],
                                      self.truth_v[layer, out_loc])
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

    def staged_truth(self, step, layer: int, b: int) -> None:
        """The staging rows of batch position ``b`` hold the request's K/V in order."""
        n = step.seq_lens[b]
        rows = step.table[b, :n].to(torch.int64)
        ids = self.r2t[step.req_rows[b], :n].to(torch.int64)
        assert torch.equal(self.kb[layer][rows], self.truth_k[layer, ids])
        assert torch.equal(self.vb[layer][rows], self.truth_v[layer, ids])


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
    assert s.staging.used == 0 and s.slots.used == 0 and not s.committed and not s.staged
    assert bool((s.loc_map == -1).all())


def test_extend_commit_accounting_and_loc_map() -> None:
    e = Engine()
    s = e.serving
    step = e.extend([1, 3], [13, 30])
    assert s.staging.used == 43 and len(set(step.out_rows.tolist())) == 43
    assert bool((step.out_rows >= e.rows.budget_rows).all())
    for b in range(2):
        for layer in (1, 2):
            e.staged_truth(step, layer, b)
    s.commit_extend(step, e.r2t)
    assert s.staging.used == 0 and s.slots.used == 2 and set(s.committed) == {1, 3}
    assert s.cache.host.used_pages == 4 + 8  # ceil(13/4) + ceil(30/4)
    assert s.tokens.num_mapped == 43
    assert bool((s.loc_map == -1).all())  # committed ids have no staging row
    with pytest.raises(RuntimeError, match="has no staging row"):
        s.translate(e.r2t[1, :2])
    assert s.usage().device_pages == 2 * e.cfg.budget_pages


def test_decode_tables_read_the_dense_truth_in_the_dense_regime() -> None:
    """Budget >= context: the table's first kv_lens rows are every token in order."""
    e = Engine(k=4)  # budget 7 pages = 28 tokens
    s = e.serving
    s.commit_extend(e.extend([0, 2], [9, 17]), e.r2t)
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
    s.commit_extend(e.extend([1, 4], [11, 26]), e.r2t)
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
    s.release_rows([2])  # aborted before its last layer: staging comes back
    e.free(e.r2t[2, :21].to(torch.int64))
    _idle(e)
    assert s.cache.host.used_pages == 0
    s.commit_extend(e.extend([3], [15]), e.r2t)
    e.decode([3])
    s.release_rows([3])  # retracted: SGLang frees its ids and re-prefills it later
    e.free(e.r2t[3, :16].to(torch.int64))
    assert s.cache.host.used_pages == 0
    s.commit_extend(e.extend([3], [16]), e.r2t)
    assert s.slots.used == 1 and s.cache.host.used_pages == 4
    e.finish(3, cache_ids=False)
    _idle(e)
    assert s.cache.host.used_pages == 0


def test_prefix_sharing_stages_from_the_host_and_shares_full_pages() -> None:
    e = Engine()
    s = e.serving
    s.commit_extend(e.extend([0], [22]), e.r2t)
    prefix = e.r2t[0, :14].to(torch.int64).tolist()  # 3 full pages + 2 tokens
    e.finish(0, cache_ids=True)
    cached_pages = s.cache.host.used_pages
    step = e.extend([5], [30], prefixes=[prefix])
    assert step.prefix_rows is not None and step.prefix_rows.numel() == 14
    for layer in (1, 2):
        e.staged_truth(step, layer, 0)  # prefix loaded from the host tier + new tokens
    s.commit_extend(step, e.r2t)
    assert s.staging.used == 0 and bool((s.loc_map == -1).all())
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
    s.commit_extend(e.extend([0], [16]), e.r2t)
    s.commit_extend(e.extend([1], [16]), e.r2t)
    # the radix cache finds row 1's prompt equal to row 0's: it swaps row 1's ids for row
    # 0's cached ids and frees its own
    own = e.r2t[1, :16].to(torch.int64)
    e.r2t[1, :16] = e.r2t[0, :16]
    e.free(own)
    before = s.cache.host.used_pages
    s.after_checkpoint(1, e.r2t)
    assert torch.equal(s.cache.t.host_pages_cpu[1, :4], s.cache.t.host_pages_cpu[0, :4])
    assert s.cache.host.used_pages == before - 4
    e.finish(1, cache_ids=False)
    e.finish(0, cache_ids=False)
    assert s.cache.host.used_pages == 0


def test_host_tier_full_asks_the_prefix_cache_to_evict() -> None:
    e = Engine(evict=True, host_pages=10)
    s = e.serving
    s.commit_extend(e.extend([0], [30]), e.r2t)  # 8 pages
    e.finish(0, cache_ids=True)
    assert s.cache.host.used_pages == 8
    s.commit_extend(e.extend([1], [20]), e.r2t)  # 5 pages: 3 must be evicted
    assert e.evicted and s.cache.host.used_pages <= 10
    e.finish(1, cache_ids=False)


def test_staging_full_is_a_clear_error_and_leaks_nothing() -> None:
    e = Engine(staging=16)
    with pytest.raises(FreeKVStagingFull, match="prefill staging is full"):
        e.extend([0], [20])
    _idle(e)


def test_row_allocators_refuse_double_release() -> None:
    st = StagingRows(10, 20)
    rows = st.alloc(4)
    assert rows is not None and rows.tolist() == [10, 11, 12, 13]
    assert st.alloc(7) is None
    st.release(rows[:2])
    with pytest.raises(ValueError, match="already free"):
        st.release(rows[:1])
    with pytest.raises(ValueError, match="out of range"):
        st.release(torch.tensor([25]))
    slots = BudgetSlots(2, 8)
    a, b = slots.alloc(), slots.alloc()
    assert (a, b, slots.alloc()) == (0, 8, None)
    slots.release(8)
    with pytest.raises(ValueError, match="already free"):
        slots.release(8)
    with pytest.raises(ValueError, match="not a chunk start"):
        slots.release(3)
