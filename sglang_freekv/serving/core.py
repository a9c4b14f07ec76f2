"""FreeKVServing: FreeKV's serving logic for an engine with logical token ids (no sglang).

A serving engine (SGLang) names every token's KV by a *logical id* and keeps per request row
the ids of its tokens (``req_to_token``). Under FreeKV the sparse layers have no row per
logical id: a prompt (or a chunk of it) is prefilled through a one-layer scratch and written
through to the host tier layer by layer (``prefill.py``); when the request decodes for the
first time it is *activated*: its budget slots are filled from the host tier; each decode step
attends over the budget rows only. Dense layers keep the engine's own full-size buffers.

API (plan once per forward, run once per layer; each returns what the engine's attention
backend needs):

* extend: :meth:`plan_extend` (scratch layout, host pages, prefix slots) -> per sparse layer
  :meth:`begin_extend_layer` + attention over ``ExtendStep.table`` in :attr:`scratch_k` /
  :attr:`scratch_v` + :meth:`end_extend_layer` -> :meth:`commit_extend` after the last layer;
* decode: :meth:`plan_decode` (activate new requests, open host pages, map this step's
  token) -> per sparse layer :meth:`begin_decode_layer` (token K/V write, wait the
  speculative job, correction) + attention over ``plan.kv_table`` + :meth:`end_decode_layer`;
* lifecycle: :meth:`release_rows` (finish, abort, retraction), :meth:`free_token_ids` /
  :meth:`free_all_tokens` (the engine freed logical ids), :meth:`after_checkpoint` (the
  radix cache deduplicated a running request's ids).

Accounting invariants (tested in ``tests/core/test_serving.py``): every host page and budget
chunk a request holds is returned by :meth:`release_rows`; host pages referenced only by
mapped logical ids (the radix cache) return when those ids are freed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sglang_freekv.cache import FreeKVCache
from sglang_freekv.config import FreeKVConfig
from sglang_freekv.device_step import (
    STAT_CHECKED,
    STAT_CORRECTED,
    STAT_RECALLED,
    DeviceDecodePlan,
    FreeKVDeviceStep,
)
from sglang_freekv.plan import FreeKVDecodePlan
from sglang_freekv.serving.prefill import (
    ExtendStep,
    FreeKVStagingFull,
    plan_extend_step,
    run_extend_layer,
    write_extend_layer,
)
from sglang_freekv.serving.rows import BudgetSlots, DeviceRows
from sglang_freekv.serving.tokens import TokenMap

__all__ = ["DECODE_STEPS", "DecodePlan", "ExtendStep", "FreeKVServing", "FreeKVStagingFull",
           "ServingUsage"]

DecodePlan = FreeKVDecodePlan | DeviceDecodePlan
# "host": the host-driven step (CPU engines); "device": the sync-free, graph-capturable step
# on fixed-size device buffers (GPUs); "auto": device on CUDA, host elsewhere.
DECODE_STEPS = ("auto", "host", "device")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServingUsage:
    """Gauges: host pages held by requests in flight, host pages held only by mapped
    logical ids (the radix cache), device pages (budget slots) in use."""

    host_pages_in_flight: int
    host_pages_cached: int
    device_pages: int


class FreeKVServing:
    """Per-rank serving state around one :class:`FreeKVCache` (see module docstring).

    Parameters
    ----------
    config : the FreeKV config.
    rows : the sparse layers' device row layout (budget chunks + a scratch page).
    scratch_k, scratch_v : ``[scratch_rows + page_size, H, D]`` (NHD), the one-layer prefill
        scratch (the last page is a margin a page-aligned read may run into).
    k_buffers, v_buffers : per local layer ``[rows, H, D]`` (NHD) device buffers; sparse
        layers have ``rows.buffer_rows`` rows, dense layers the engine's full size (unused).
    num_qo_heads : query heads of this rank.
    num_token_ids : logical ids the engine hands out (``req_to_token`` values are below it).
    num_host_pages : pages of the host tier.
    max_pages_per_req : longest request in pages (context length / page_size, rounded up).
    max_req_rows : request rows of the engine (``req_to_token`` rows; a row id is below it).
    pin_memory : pin the host tier (default: when the buffers are on CUDA).
    keep_partial_pages : write a released request's partial last page to the host tier
        (needed when the engine keeps its ids for prefix sharing, i.e. a radix cache).
    evict : ``evict(num_tokens) -> tokens_evicted``, asks the engine's prefix cache to free
        logical ids when the host tier runs out of pages (None: no prefix cache).
    decode_step : ``DECODE_STEPS``: which decode step runs (see ``device_step.py``).
    max_bs : lanes of the device step (default ``rows.max_reqs``; the largest captured batch
        size under CUDA graphs).
    """

    def __init__(
        self,
        config: FreeKVConfig,
        rows: DeviceRows,
        *,
        scratch_k: torch.Tensor,
        scratch_v: torch.Tensor,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        num_qo_heads: int,
        num_token_ids: int,
        num_host_pages: int,
        max_pages_per_req: int,
        max_req_rows: int,
        pin_memory: bool | None = None,
        keep_partial_pages: bool = True,
        evict: Callable[[int], int] | None = None,
        decode_step: str = "auto",
        max_bs: int | None = None,
    ) -> None:
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step={decode_step!r}: must be one of {DECODE_STEPS}")
        if rows.budget != config.budget:
            raise ValueError(f"rows.budget ({rows.budget}) != config.budget ({config.budget})")
        kb0 = k_buffers[0]
        self.cfg = config
        self.rows = rows
        self.device = kb0.device
        self.cache = FreeKVCache(
            config, num_layers=len(k_buffers), num_qo_heads=num_qo_heads,
            num_kv_heads=kb0.shape[1], head_dim=kb0.shape[2], dtype=kb0.dtype,
            device=self.device, max_reqs=max_req_rows,
            max_pages_per_req=max_pages_per_req, num_host_pages=num_host_pages,
            k_buffers=k_buffers, v_buffers=v_buffers, pin_memory=pin_memory)
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        self.sparse_layers = list(self.cache.sparse_layers)
        if decode_step == "auto":
            decode_step = "device" if self.device.type == "cuda" else "host"
        self.device_step: FreeKVDeviceStep | None = None
        if decode_step == "device":
            short = [i for i in self.sparse_layers if k_buffers[i].shape[0] < rows.buffer_rows]
            if short:
                raise ValueError(f"the device step needs {rows.buffer_rows} rows per sparse "
                                 f"layer (scratch rows included); layer {short[0]} has "
                                 f"{k_buffers[short[0]].shape[0]}")
            self.device_step = FreeKVDeviceStep(
                self.cache, max_bs=max_bs or rows.max_reqs, scratch_row=rows.scratch_row)
        self.slots = BudgetSlots(rows.max_reqs, rows.budget)
        self.scratch_k, self.scratch_v = scratch_k, scratch_v
        self.scratch_rows = int(scratch_k.shape[0]) - config.page_size
        self.tokens = TokenMap(num_token_ids, self.cache.host)
        self.keep_partial_pages = keep_partial_pages
        self.evict = evict
        self.committed: dict[int, int] = {}  # req row -> first row of its budget chunk (active)
        self.prefilled: dict[int, int] = {}  # req row -> tokens on the host tier (not active)
        self.own_pages: dict[int, set[int]] = {}  # req row -> host pages it allocated
        self.kv_lens: dict[int, int] = {}  # req row -> tokens with KV (committed rows)
        self._evict_logged = False
        # decode tokens' (logical ids copied to pinned host memory, host slots, copy event),
        # mapped at the next host-side call: the step itself never waits for the device
        self._pending_maps: list[tuple[torch.Tensor, torch.Tensor, object]] = []
        # the stream forwards run on (CUDA): release and host-side frees enqueue their
        # device work there, behind any forward still in flight (overlap scheduler)
        self._stream: torch.cuda.Stream | None = None

    # ------------------------------------------------------------------ extend
    def plan_extend(
        self,
        req_rows: Sequence[int],
        seq_lens: Sequence[int],
        prefix_lens: Sequence[int],
        out_loc: torch.Tensor,
        req_to_token: torch.Tensor,
    ) -> ExtendStep:
        """Plan one extend forward (a whole prompt, or a chunk after ``prefix_lens`` tokens
        already prefilled or matched in the radix cache).

        ``out_loc``: ``[sum(seq_lens - prefix_lens)]`` int, the new tokens' logical ids in
        batch order; ``req_to_token``: ``[rows, max_context]`` int, logical ids per request
        row and position. Allocates the host pages the new tokens need. Raises
        :class:`FreeKVStagingFull` or ``FreeKVHostPoolFull`` (nothing changed then).
        """
        self._flush_maps()
        self._note_stream()
        # SYNC: a speculative job of the last decode step may still run on the worker; an
        # extend (host pages, digests, prefix reads, then activations) never overlaps its
        # reads of the host tier. A cheap ordering (the wrong K/V once blamed on the overlap
        # was race 10, the plan's copies of the engine's tensors: docs/design.md).
        self.cache.wait_jobs()
        rows_l, lens_l, pref_l = list(req_rows), list(seq_lens), list(prefix_lens)
        n_new = int(out_loc.numel())
        if n_new != sum(lens_l) - sum(pref_l):
            raise ValueError(f"out_loc has {n_new} ids for {sum(lens_l) - sum(pref_l)} new "
                             "tokens")
        for row in rows_l:
            if row in self.committed:  # a retracted request comes back: start over
                self.release_rows([row])
        return plan_extend_step(self, rows_l, lens_l, pref_l, out_loc, req_to_token)

    def begin_extend_layer(self, layer: int, step: ExtendStep, k: torch.Tensor,
                           v: torch.Tensor) -> None:
        """Before attention of sparse ``layer``: the batch's prefixes (from the host tier)
        and the new tokens' K/V (``[num_new, H, D]``) into the scratch."""
        run_extend_layer(self, layer, step, k, v)

    def end_extend_layer(self, layer: int, step: ExtendStep) -> None:
        """After attention of sparse ``layer``: write the touched pages through to the host
        tier, digests of the complete ones."""
        write_extend_layer(self, layer, step)

    def commit_extend(self, step: ExtendStep) -> None:
        """After the last layer of an extend: map the new tokens' logical ids to their host
        slots; the requests decode (or get their next chunk) from the host tier."""
        self.tokens.map(step.new_ids, step.new_slots)
        dev = self.cache.t.host_pages.device
        for row, n in zip(step.req_rows, step.seq_lens):
            self.cache.t.host_pages[row] = self.cache.t.host_pages_cpu[row].to(dev)
            self.prefilled[row] = n

    def _activate(self, row: int, n: int) -> None:
        """First decode step of a prefilled request (``n`` tokens on the host tier): a budget
        chunk, its slots filled from the host tier."""
        chunk = self.slots.alloc()
        if chunk is None:
            raise RuntimeError(f"freekv: no free budget slots ({self.slots.count} running "
                               "requests); the scheduler admitted more than "
                               "max_running_requests")
        g = self.cache.g
        try:
            slot_loc = chunk + torch.arange(g.budget_pages, dtype=torch.int64) * g.page_size
            self.cache.t.set_slots(row, slot_loc)
            self.cache.activate(row, n)
        except BaseException:
            self.slots.release(chunk)
            raise
        self.prefilled.pop(row, None)
        self.kv_lens[row] = n
        if self.device_step is not None:
            self.device_step.forget(row)
        self.committed[row] = chunk

    # ------------------------------------------------------------------ decode
    def plan_decode(
        self,
        req_rows: torch.Tensor,
        seq_lens: torch.Tensor,
        req_rows_cpu: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        out_loc: torch.Tensor,
        req_to_token: torch.Tensor,
        lanes: int | None = None,
    ) -> DecodePlan:
        """Plan one decode step (host work: out of any CUDA graph).

        ``req_rows``/``seq_lens``: ``[bs]`` int (device; seq_len includes this step's token),
        ``*_cpu`` their host copies; ``out_loc``: ``[bs]`` logical ids of this step's tokens.
        ``lanes``: lanes the device step runs (graph padding; default ``bs``). Activates any
        request decoding for the first time, allocates the host page this token opens and
        maps its logical id to its host slot.
        """
        self._flush_maps()
        self._note_stream()
        rows_c = req_rows_cpu.to(torch.int64)
        lens_c = seq_lens_cpu.to(torch.int64)
        for row, n in zip(rows_c.tolist(), lens_c.tolist()):
            if row not in self.committed:
                if self.prefilled.get(row) != n - 1:
                    raise RuntimeError(f"freekv: request row {row} decodes at {n} tokens but "
                                       f"{self.prefilled.get(row)} were prefilled")
                self._activate(row, n - 1)
        self.ensure_host_pages(int(rows_c.numel()))  # at most one opened page each
        plan: DecodePlan
        if self.device_step is not None:
            plan = self.device_step.plan(rows_c, lens_c, lanes)
        else:
            plan = self.cache.plan_decode(req_rows, seq_lens, lens_c, rows_c)
        p = self.cache.g.page_size
        pos = lens_c - 1
        page = self.cache.t.host_pages_cpu[rows_c, pos // p].to(torch.int64)
        self._map_later(out_loc, page * p + pos % p)
        for row, n in zip(plan.rows_list, plan.seq_lens_list):
            self.kv_lens[row] = n
        return plan

    def _note_stream(self) -> None:
        if self.device.type == "cuda":
            self._stream = torch.cuda.current_stream(self.device)

    def _forward_stream(self) -> contextlib.AbstractContextManager[object]:
        """Run device work on the stream of the last forward (CUDA), so it is ordered after
        that forward even when the engine frees requests while it runs (overlap)."""
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    def _map_later(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Map logical ``ids`` (device) to host ``slots`` (cpu): at once for host tensors;
        for CUDA ids through a non-blocking copy to pinned memory, applied by
        :meth:`_flush_maps` (no host sync on the decode path)."""
        if ids.device.type != "cuda":
            self.tokens.map(ids, slots)
            return
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()  # STREAM: after the copy on the current stream
        self._pending_maps.append((host, slots, done))

    def _flush_maps(self) -> None:
        """Apply the pending decode-token maps (every host-side reader calls this first)."""
        pending, self._pending_maps = self._pending_maps, []
        for host, slots, done in pending:
            done.synchronize()  # SYNC: a copy of an earlier step; normally long complete
            self.tokens.map(host, slots)

    def ensure_lanes(self, max_bs: int) -> None:
        """The device step runs up to ``max_bs`` lanes (CUDA graphs' largest batch)."""
        if self.device_step is not None and self.device_step.max_bs < max_bs:
            self.device_step = FreeKVDeviceStep(self.cache, max_bs=max_bs,
                                                scratch_row=self.rows.scratch_row)

    def begin_decode_layer(self, layer: int, plan: DecodePlan, q: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor) -> None:
        """Before attention of sparse ``layer``: move the page leaving the window (dense
        regime), write this token's K/V (``[bs, H, D]``) into its budget row, wait the
        layer's speculative job and correct drifted heads. ``q``: ``[bs, Hq, D]``.
        Device step: no host sync, graph-capturable."""
        if isinstance(plan, DeviceDecodePlan):
            assert self.device_step is not None
            self.device_step.before_attention(layer, q, k, v)
            return
        cache = self.cache
        kb, vb = self.k_buffers[layer], self.v_buffers[layer]
        cache.prepare_layer(layer, plan)  # before the write: it may reuse the ring slot
        kb[plan.token_loc] = k.to(kb.dtype)
        vb[plan.token_loc] = v.to(vb.dtype)
        cache.before_attention(layer, plan, q)

    def end_decode_layer(self, layer: int, plan: DecodePlan, q: torch.Tensor) -> None:
        """After attention of sparse ``layer``: write through completed pages and submit the
        speculative selection for the next step."""
        if isinstance(plan, DeviceDecodePlan):
            assert self.device_step is not None
            self.device_step.after_attention(layer, q)
            return
        self.cache.after_attention(layer, plan, q)

    def stats(self) -> dict[str, int]:
        """Counters (recall_bytes, recalled_pages, checked_heads, corrected_heads,
        job_wait_ns) and host_pages_used. Device step: reads its device counters (a host
        sync; call it out of the decode step, e.g. once per step from the metrics)."""
        out = {k: int(v) for k, v in self.cache.stats().items() if not isinstance(v, list)}
        if self.device_step is not None:
            dev = self.device_step.stats.tolist()  # SYNC: metrics only, out of the step
            out["checked_heads"] += int(dev[STAT_CHECKED])
            out["corrected_heads"] += int(dev[STAT_CORRECTED])
            out["recalled_pages"] += int(dev[STAT_RECALLED])
            out["recall_bytes"] += int(dev[STAT_RECALLED]) * self.cache.recall.block_bytes
        return out

    # ------------------------------------------------------------------ lifecycle
    def release_rows(self, rows: Sequence[int]) -> None:
        """Requests at ``rows`` finished, were aborted or retracted: return their budget
        chunk and host page references."""
        self._flush_maps()
        with self._forward_stream():  # STREAM: behind a forward that may still read the row
            self._release_rows(rows)

    def _release_rows(self, rows: Sequence[int]) -> None:
        for row in rows:
            chunk = self.committed.pop(row, None)
            kv_len = self.kv_lens.pop(row, None)
            prefilled = self.prefilled.pop(row, None)
            self.own_pages.pop(row, None)
            if chunk is not None:
                # The engine may keep this request's ids (prefix sharing): its partial last
                # page must then be readable from the host tier.
                self.cache.release(row, kv_len if self.keep_partial_pages else None)
                self.slots.release(chunk)
                if self.device_step is not None:
                    self.device_step.forget(row)
            elif prefilled is not None or bool((self.cache.t.host_pages_cpu[row] >= 0).any()):
                # Prefilled (whole or in part) but never decoded: its pages are all written.
                self.cache.release(row, None)

    def free_token_ids(self, ids: torch.Tensor) -> int:
        """The engine freed logical ``ids``: drop their host page references; returns the
        host pages freed."""
        self._flush_maps()
        return self.tokens.unmap(ids)

    def free_all_tokens(self) -> int:
        self._flush_maps()
        return self.tokens.unmap_all()

    def after_checkpoint(self, row: int, req_to_token: torch.Tensor) -> None:
        """The radix cache replaced some of running request ``row``'s ids by the ids of an
        identical cached prefix (and freed its own): move the request's full pages to the
        cached copies, so duplicate host pages do not outgrow the host tier."""
        if row not in self.committed:
            return
        self._flush_maps()
        p = self.cache.g.page_size
        full = self.kv_lens.get(row, 0) // p * p
        shared = self.tokens.shared_pages(req_to_token[row, :full])
        f = int(shared.numel())
        if f == 0:
            return
        mine = self.cache.t.host_pages_cpu[row, :f].to(torch.int64)
        diff = torch.nonzero(mine != shared).flatten()
        self.cache.replace_pages(row, diff, shared[diff])

    def ensure_host_pages(self, n: int) -> None:
        """Make ``n`` host pages free, asking the engine's prefix cache to evict if needed
        (cached prefixes hold host pages; the host tier holds ``max_total_tokens`` plus one
        page per request, so partial cached pages can exhaust it before the token pool)."""
        host = self.cache.host
        if host.free_pages >= n:
            return
        log = logger.debug if self._evict_logged else logger.info
        self._evict_logged = True
        log("freekv: host tier has %d free pages, %d needed: evicting prefix-cache entries "
            "(logged once at info)", host.free_pages, n)
        if self.evict is None:
            return
        p = self.cache.g.page_size
        while host.free_pages < n:
            if self.evict(max(p, (n - host.free_pages) * p)) == 0:
                break  # nothing evictable: the allocation raises a clear error

    # ------------------------------------------------------------------ gauges
    def usage(self) -> ServingUsage:
        self._flush_maps()
        held = sorted(set(self.committed) | set(self.prefilled) | set(self.own_pages))
        tables = self.cache.t.host_pages_cpu[held]
        in_flight = int(torch.unique(tables[tables >= 0]).numel()) if tables.numel() else 0
        device = len(self.committed) * self.cache.g.budget_pages
        return ServingUsage(in_flight, self.cache.host.used_pages - in_flight, device)

    def translate(self, ids: torch.Tensor) -> torch.Tensor:
        """Device rows of logical ``ids`` in a sparse layer: there are none (prompts go
        through the prefill scratch, decode tokens through the budget rows), so a write
        through SGLang's generic path to a sparse layer is refused instead of landing in
        some other request's rows."""
        raise RuntimeError("freekv: a KV write to a sparse layer through SGLang's generic "
                           "path; the freekv attention backend writes sparse layers itself")
