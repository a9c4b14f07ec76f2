"""FreeKVDeviceStep: FreeKV's decode step as device work on fixed-size buffers (GPU mode).

The host-driven step (``FreeKVCache.before_attention`` / ``after_attention``) decides per
layer on the host which heads to correct, copies recall lists to the host and waits worker
futures: fine for CPU engines, but every sparse layer of every step then waits for the GPU,
and none of it can be captured in a CUDA graph. Here the same decode step (same selection
rule, same residency, same slots) is device work only, over buffers preallocated for
``max_bs`` lanes:

* ``plan`` (once per step, **out of graph**: host work allowed): allocates the host pages this
  step's tokens open, fills the static lane buffers (request rows, seq_lens, new page ids;
  lanes past the batch are padding: row ``pad_row``, seq_len 0) and derives every per-step
  tensor on the device (token rows, budget table, candidates now and at ``n + 1``, the
  dense-regime window exit, completed pages) with no host sync.
* ``before_attention`` (per sparse layer, **graph-capturable**): window exit copy and this
  token's K/V write (masked), correction flags (group-mean cosine vs ``tau``, and lanes whose
  speculative selection did not serve this step), a masked top-k selection with ``q_t`` for
  every lane, the vectorized residency diff restricted to the flagged heads, and the recall
  of the new (page, head) blocks straight from the mapped host tier (``recall_direct``).
  Heads that do not drift are masked, not skipped by Python.
* ``after_attention`` (per sparse layer, **graph-capturable**): write-through of completed
  pages (``backup_direct`` into the host tier, digests into the device table; masked),
  ``last_q``, and the speculative selection + recall for step ``t + 1`` with ``q_t`` over the
  candidates of ``n + 1``, forked onto a side stream so it overlaps the remaining layers of
  this step; the last sparse layer joins it (a captured graph must end joined).

Races (freekv-method.md §8) hold by stream order: the speculative job of layer ``l`` forks
after layer ``l``'s attention was enqueued (5) and reads the persistent ``last_q`` written
before the fork (6); the join at the step's end precedes every later reader of its slots and
residency, so no event can be stale (7); jobs of different layers write different layers'
buffers (8); the head mask is computed per layer, never shared (9).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang_freekv.kernels.correct import correction_flags
from sglang_freekv.kernels.digest import page_digest
from sglang_freekv.kernels.direct import backup_direct, recall_direct
from sglang_freekv.kernels.select import select_pages
from sglang_freekv.layout import (
    _attended_slots,
    budget_attention_table,
    candidate_range,
    page_slot,
    token_loc,
)
from sglang_freekv.retrieval import residency_diff
from sglang_freekv.threads import single_intra_op_thread

if TYPE_CHECKING:
    from sglang_freekv.cache import FreeKVCache

__all__ = ["DeviceDecodePlan", "FreeKVDeviceStep"]

STAT_CHECKED, STAT_CORRECTED, STAT_RECALLED = 0, 1, 2


@dataclass(slots=True)
class DeviceDecodePlan:
    """One step's plan in GPU mode: host lists, and views of the step's static buffers."""

    # fmt: off
    bs: int                     # requests of the batch (lanes [0, bs))
    lanes: int                  # lanes run: bs, or the captured batch size under graphs
    rows_list: list[int]        # request rows (host)
    seq_lens_list: list[int]    # seq_len incl. this token (host)
    kv_lens_cpu: torch.Tensor   # [lanes] int32 cpu, budget rows attended (padding: 1)
    kv_table: torch.Tensor      # [lanes, budget] int32 device rows in attention order
    kv_lens: torch.Tensor       # [lanes] int32
    token_loc: torch.Tensor     # [lanes] int64, this token's row (padding: the scratch row)
    # fmt: on


class FreeKVDeviceStep:
    """GPU-mode decode step over ``cache``'s state (see the module docstring).

    Parameters
    ----------
    cache : the rank's FreeKVCache (host tier pinned and mapped on CUDA).
    max_bs : most lanes a step runs (``max_running_requests``, or the largest captured
        batch size).
    scratch_row : first of ``page_size`` device rows of the sparse layers that nothing else
        uses: padding lanes write and read there.
    pad_row : a request row no request uses (SGLang's row 0, the graph padding row).
    """

    def __init__(self, cache: FreeKVCache, *, max_bs: int, scratch_row: int,
                 pad_row: int = 0) -> None:
        if cache.device.type == "cuda" and not cache.host.pin_memory:
            raise ValueError("the device step reads the host tier by address: pin it")
        self.cache = cache
        self.g = g = cache.g
        self.max_bs, self.scratch, self.pad_row = max_bs, scratch_row, pad_row
        dev = self.device = cache.device
        z = lambda *s, dt=torch.int64: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        # fmt: off
        self.rows = z(max_bs)                         # [max_bs] int64 request rows
        self.lens = z(max_bs)                         # [max_bs] int64 seq_len (0: padding)
        self.new_page = z(max_bs)                     # [max_bs] int64 host page opened (-1)
        self.slot_loc = z(max_bs, g.budget_pages)     # [max_bs, budget_pages] int64
        self.page_table = z(max_bs, cache.max_pages, dt=torch.int32)
        self.token_loc = z(max_bs)
        self.kv_table = z(max_bs, g.budget_pages * g.page_size, dt=torch.int32)
        self.kv_lens = z(max_bs, dt=torch.int32)
        self.cand_start = z(max_bs, dt=torch.int32)
        self.cand_end = z(max_bs, dt=torch.int32)     # == cand_start where not sparse
        self.next_end = z(max_bs, dt=torch.int32)     # candidates at n + 1 (masked)
        self.sparse = z(max_bs, dt=torch.bool)
        self.next_sparse = z(max_bs, dt=torch.bool)
        self.ex = z(max_bs, dt=torch.bool)            # window exit (dense regime)
        self.ex_src = z(max_bs)
        self.ex_dst = z(max_bs)
        self.ex_slot = z(max_bs)
        self.ex_page = z(max_bs, dt=torch.int32)
        self.comp = z(max_bs, dt=torch.bool)          # this token completed a page
        self.comp_src = z(max_bs)
        self.comp_host = z(max_bs)
        # per (layer, request row): the seq_len the last speculative selection served (-1)
        self.served = torch.full((cache.num_layers, cache.max_reqs), -1, dtype=torch.int64,
                                 device=dev)
        self.stats = z(3)                             # checked, corrected, recalled blocks
        # fmt: on
        self.sink_page = cache.digests.shape[1] - 1  # digest row masked writes target
        self.side = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        self._forked = False
        self._offs = torch.arange(g.page_size, device=dev)
        # CPU tensors (tests, CPU engines): FreeKV's small ops run on one intra-op thread
        self._host_ops = dev.type == "cpu"

    # ------------------------------------------------------------------ requests
    def forget(self, req_row: int) -> None:
        """No speculative selection has served ``req_row`` (admitted or released)."""
        self.served[:, req_row] = -1

    # ------------------------------------------------------------------ step plan
    def plan(self, req_rows_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor,
             lanes: int | None = None) -> DeviceDecodePlan:
        """Host part of a step (out of graph) + the derived device tensors.

        ``req_rows_cpu``, ``seq_lens_cpu``: ``[bs]`` int (cpu), seq_len incl. this token.
        ``lanes``: lanes to run (>= bs; graph padding), default ``bs``. Allocates the host
        pages this step's tokens open (raises FreeKVHostPoolFull).
        """
        cache, g = self.cache, self.g
        rows_c = req_rows_cpu.to(torch.int64)
        lens_c = seq_lens_cpu.to(torch.int64)
        bs = int(rows_c.numel())
        lanes = bs if lanes is None else lanes
        if not bs <= lanes <= self.max_bs:
            raise ValueError(f"FreeKVDeviceStep.plan: {bs} requests in {lanes} lanes "
                             f"(max_bs {self.max_bs})")
        p_new = (lens_c - 1) // g.page_size
        tbl = cache.t.host_pages_cpu
        need = tbl[rows_c, p_new] < 0  # [bs] bool: pages opened by this step's tokens
        new_page = torch.full((self.max_bs,), -1, dtype=torch.int64)
        if bool(need.any()):
            ids = cache.host.alloc_each(rows_c[need])  # raises FreeKVHostPoolFull
            tbl[rows_c[need], p_new[need]] = ids.to(torch.int32)
            new_page[:bs][need] = ids
        pin = self.device.type == "cuda"
        lane = torch.empty((3, self.max_bs), dtype=torch.int64, pin_memory=pin)
        lane[0].fill_(self.pad_row)
        lane[0, :bs] = rows_c
        lane[1].zero_()
        lane[1, :bs] = lens_c
        lane[2] = new_page
        dev_lane = lane.to(self.device, non_blocking=True)  # pinned: stream-ordered H2D
        self.rows.copy_(dev_lane[0])
        self.lens.copy_(dev_lane[1])
        self.new_page.copy_(dev_lane[2])
        last = cache.host._last_write
        if last is not None and self.device.type == "cuda":
            # STREAM: prompt write-through (D2H on the host tier's backup stream) lands before
            # any recall of this step reads those host pages; a device wait, no host sync.
            torch.cuda.current_stream(self.device).wait_event(last)
        self._derive()
        _, _, kv_lens_cpu = _attended_slots(lens_c, g)
        kv_lens_cpu = torch.cat([kv_lens_cpu.to(torch.int32),
                                 torch.ones(lanes - bs, dtype=torch.int32)])
        return DeviceDecodePlan(
            bs=bs, lanes=lanes, rows_list=rows_c.tolist(), seq_lens_list=lens_c.tolist(),
            kv_lens_cpu=kv_lens_cpu, kv_table=self.kv_table[:lanes],
            kv_lens=self.kv_lens[:lanes], token_loc=self.token_loc[:lanes])

    def _derive(self) -> None:
        """Every per-step tensor from the lane buffers (device ops only, no host sync)."""
        g, cache, p = self.g, self.cache, self.g.page_size
        n, rows = self.lens, self.rows
        active = n > 0
        n1 = n.clamp(min=1)
        # host page of the page opened by this token (the host mirror is already updated)
        tbl = cache.t.host_pages  # [max_reqs, max_pages] int32
        opened = self.new_page >= 0
        upd_r = torch.where(opened, rows, self.pad_row)
        upd_c = torch.where(opened, (n1 - 1) // p, 0)
        tbl[upd_r, upd_c] = torch.where(opened, self.new_page.to(torch.int32), tbl[upd_r, upd_c])
        self.slot_loc.copy_(cache.t.slot_loc[rows])
        self.page_table.copy_(tbl[rows])
        self.token_loc.copy_(torch.where(active, token_loc(self.slot_loc, n1, g), self.scratch))
        table, kv_lens = budget_attention_table(self.slot_loc, n1, g)
        self.kv_table.copy_(torch.where(active[:, None], table, self.scratch))
        self.kv_lens.copy_(torch.where(active, kv_lens, 1))
        cs, ce, sp = candidate_range(n1, g)
        _, nce, nsp = candidate_range(n1 + 1, g)
        sp, nsp = sp & active, nsp & active
        self.cand_start.copy_(cs)
        self.cand_end.copy_(torch.where(sp, ce, cs))
        self.next_end.copy_(torch.where(nsp, nce, cs))
        self.sparse.copy_(sp)
        self.next_sparse.copy_(nsp)
        # dense-regime window exit: the token opening page p_new evicts p_new - nw
        pos = n1 - 1
        pn = pos // p
        p_old = pn - g.window_pages
        j = p_old - g.sink_pages
        self.ex.copy_(active & (pos % p == 0) & (p_old >= g.sink_pages) & (j < g.top_k))
        ring = g.sink_pages + g.top_k + pn % g.window_pages
        self.ex_src.copy_(self.slot_loc.gather(1, ring[:, None]).squeeze(1))
        jc = j.clamp(0, g.top_k - 1)
        self.ex_dst.copy_(self.slot_loc.gather(1, (g.sink_pages + jc)[:, None]).squeeze(1))
        self.ex_slot.copy_(jc)
        self.ex_page.copy_(p_old.to(torch.int32))
        # pages completed by this token (written through after attention)
        pc = (n1 // p - 1).clamp(min=0)
        host_c = tbl[rows, pc].to(torch.int64)
        self.comp.copy_(active & (n1 % p == 0) & (host_c >= 0))
        self.comp_src.copy_(self.slot_loc.gather(1, page_slot(pc, g)[:, None]).squeeze(1))
        self.comp_host.copy_(host_c.clamp(min=0))

    # ------------------------------------------------------------------ per layer
    def before_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> None:
        """Window exit, this token's K/V write, correction (masked). ``q [lanes, Hq, D]``,
        ``k``/``v`` ``[lanes, H, D]``. Graph-capturable; no host sync."""
        with single_intra_op_thread(self._host_ops):
            self._before_attention(layer, q, k, v)

    def _before_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> None:
        cache = self.cache
        lanes = q.shape[0]
        kb, vb = cache.k_buffers[layer], cache.v_buffers[layer]
        rows = self.rows[:lanes]
        ex = self.ex[:lanes]
        src = torch.where(ex, self.ex_src[:lanes], self.scratch)[:, None] + self._offs
        dst = torch.where(ex, self.ex_dst[:lanes], self.scratch)[:, None] + self._offs
        kb[dst] = kb[src]  # [lanes, P, H, D]; non-exiting lanes copy the scratch onto itself
        vb[dst] = vb[src]
        res = cache.residency[layer]  # [max_reqs, H, k]
        heads = torch.arange(cache.num_kv_heads, device=self.device)[None, :]
        slot = self.ex_slot[:lanes, None]
        cur = res[rows[:, None], heads, slot]  # [lanes, H]
        res[rows[:, None], heads, slot] = torch.where(
            ex[:, None], self.ex_page[:lanes, None], cur)
        tok = self.token_loc[:lanes]
        kb[tok] = k.to(kb.dtype)
        vb[tok] = v.to(vb.dtype)
        sparse = self.sparse[:lanes]
        if cache.cfg.speculative:
            valid = sparse & (self.served[layer, rows] == self.lens[:lanes])  # [lanes]
            redo = (sparse & ~valid)[:, None]  # no speculative selection for this step
            if cache.cfg.tau is not None:
                drift, _ = correction_flags(q, cache.last_q[layer, rows], cache.num_kv_heads,
                                            float(cache.cfg.tau))
                corrected = valid[:, None] & drift  # [lanes, H]
                flags = redo | corrected
                self.stats[STAT_CHECKED] += valid.sum() * cache.num_kv_heads
                self.stats[STAT_CORRECTED] += corrected.sum()
            else:
                flags = redo.expand(lanes, cache.num_kv_heads)
        else:
            flags = sparse[:, None].expand(lanes, cache.num_kv_heads)
        self._select_and_recall(layer, q, self.cand_end[:lanes], flags)

    def after_attention(self, layer: int, q: torch.Tensor) -> None:
        """Write-through of completed pages, ``last_q``, and the speculative selection for
        step ``t + 1`` on the side stream (joined by the last sparse layer). ``q`` is this
        step's query ``[lanes, Hq, D]``. Graph-capturable; no host sync."""
        with single_intra_op_thread(self._host_ops):
            self._after_attention(layer, q)

    def _after_attention(self, layer: int, q: torch.Tensor) -> None:
        cache = self.cache
        lanes = q.shape[0]
        kb, vb = cache.k_buffers[layer], cache.v_buffers[layer]
        comp = self.comp[:lanes]
        src, host_ids = self.comp_src[:lanes], self.comp_host[:lanes]
        backup_direct(kb, vb, src, host_ids, comp, cache.host.kv[layer])
        dig = page_digest(kb, src, self.g.page_size)  # [lanes, H, 2, D]
        cache.digests[layer].index_copy_(0, torch.where(comp, host_ids, self.sink_page), dig)
        rows = self.rows[:lanes]
        if cache.cfg.speculative:
            cache.last_q[layer].index_copy_(0, rows, q.to(cache.dtype))  # persistent (race 6)
            main = torch.cuda.current_stream(self.device) if self.side is not None else None
            if self.side is not None:
                # STREAM: the job forks after this layer's attention and the last_q write were
                # enqueued (races 5, 6); the last sparse layer joins it below.
                self.side.wait_stream(main)
                self._forked = True
            ctx = torch.cuda.stream(self.side) if self.side is not None else \
                contextlib.nullcontext()
            with ctx:
                nsp = self.next_sparse[:lanes]
                qj = cache.last_q[layer, rows]  # [lanes, Hq, D]
                mask = nsp[:, None].expand(lanes, cache.num_kv_heads)
                self._select_and_recall(layer, qj, self.next_end[:lanes], mask)
                served = self.served[layer]
                served[rows] = torch.where(nsp, self.lens[:lanes] + 1, served[rows])
        if layer == cache.sparse_layers[-1]:
            self.join()

    def join(self) -> None:
        """Make the current stream wait every speculative job forked this step."""
        if self.side is not None and self._forked:
            # STREAM: joined before the step (and a captured graph) ends: the next step's
            # plan rewrites the lane buffers these jobs read, and its layers read their slots.
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self._forked = False

    def _select_and_recall(self, layer: int, q: torch.Tensor, cand_end: torch.Tensor,
                           head_mask: torch.Tensor) -> None:
        """Top-k with ``q`` over ``[cand_start, cand_end)`` for every lane, residency diff on
        the heads of ``head_mask`` (``[lanes, H]`` bool), recall of the new blocks."""
        cache, g = self.cache, self.g
        lanes = q.shape[0]
        rows = self.rows[:lanes]
        page_table, slot_loc = self.page_table[:lanes], self.slot_loc[:lanes]
        sel, scores = select_pages(q, cache.digests[layer], page_table, self.cand_start[:lanes],
                                   cand_end, cache.num_kv_heads, cache.cfg.top_k,
                                   scale=cache.score_scale, span_weight=cache.cfg.span_weight,
                                   head_mask=head_mask)  # unflagged heads are not scored
        res = cache.residency[layer][rows]  # [lanes, H, k]
        rl, new_res = residency_diff(sel, scores, res, head_mask, impl="vector")
        cache.residency[layer].index_copy_(0, rows, new_res)  # padding lanes: unchanged
        host_ids = page_table[rl.batch, rl.page.clamp(min=0)].to(torch.int64)
        dst = slot_loc[rl.batch, g.sink_pages + rl.slot]
        recall_direct(cache.host.kv[layer], host_ids, rl.head, dst, rl.count,
                      cache.k_buffers[layer], cache.v_buffers[layer])
        self.stats[STAT_RECALLED] += rl.count[0]
