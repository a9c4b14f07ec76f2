"""FreeKVCache: the per-rank FreeKV orchestrator driven by the attention backend.

Owns the slot/page tables, residency, digests, ``last_q``, the host tier and the recall
engine, and implements design.md: ``admit`` / ``commit_prefill`` / ``release`` per request,
``plan_decode`` once per step, and ``prepare_layer`` / ``before_attention`` /
``after_attention`` per (non-dense) layer.

Races of freekv-method.md §8 and how they are closed here:
(5) the speculative scatter waits ``attn_done`` (CUDA: the job stream waits an event recorded
after attention; CPU: ``before_scatter.wait()``); (6) the job reads the persistent ``last_q``
after a q-ready event; (7) ``before_attention`` waits the job's Future *before* its event;
(8) one ordered worker with its own staging set (the main thread uses another one);
(9) the head flags are snapshotted per job; (10) the plan holds its own copies of the
engine's row and length tensors, which the engine may rewrite for its next forward while a
job of this step still reads them. Each protection sits behind one small protected method
(``_scatter_fence``, ``_job_query``, ``_wait_job``, ``_job_head_mask``, ``_plan_inputs``)
that the race tests override from outside to show the unprotected variant fails.

Note: not CUDA-graph capturable (host syncs for any(flags) and for recall lists).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from sglang_freekv.cache_ops import (
    CacheTables,
    apply_selection,
    fill_slots_from_host,
    write_prompt,
)
from sglang_freekv.config import FreeKVConfig
from sglang_freekv.kernels.select import CpuScoreWindow, cpu_select_window, plan_cpu_window
from sglang_freekv.layout import BudgetGeometry
from sglang_freekv.plan import FreeKVDecodePlan, build_plan
from sglang_freekv.pool_host import FreeKVHostPool
from sglang_freekv.recall import FreeKVRecallEngine
from sglang_freekv.retrieval import select_batch
from sglang_freekv.step_job import StepJobInputs, run_step_job
from sglang_freekv.threads import single_intra_op_thread

__all__ = ["FreeKVCache", "FreeKVDecodePlan"]

@dataclass(slots=True)
class _LayerStep:
    """What before_attention hands to after_attention for one layer."""

    sel: torch.Tensor | None = None  # [bs, H, k] int32, selection with q_t (if computed)
    scores: torch.Tensor | None = None  # [bs, H, k] fp32
    flags: torch.Tensor | None = None  # [bs, H] bool view of the shared flags buffer


class FreeKVCache:
    """Per-rank FreeKV state and decode-step hooks (see module docstring)."""

    def __init__(
        self,
        config: FreeKVConfig,
        *,
        num_layers: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_reqs: int,
        max_pages_per_req: int,
        num_host_pages: int,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        pin_memory: bool | None = None,
        recall_group_blocks: int = 64,
    ) -> None:
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        self.cfg = config
        self.g = BudgetGeometry.of(config)
        self.device = torch.device(device)
        self.num_layers, self.num_qo_heads = num_layers, num_qo_heads
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.max_reqs, self.max_pages = max_reqs, max_pages_per_req
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        dense = {i for i in config.dense_layers if i < num_layers}
        self.sparse_layers = [i for i in range(num_layers) if i not in dense]
        self._is_sparse = [i not in dense for i in range(num_layers)]
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        # CPU engine: the per-layer hooks run with one intra-op thread (sglang_freekv.threads)
        self._host_ops = self.device.type == "cpu"
        # one speculative job per step for all sparse layers (sglang_freekv.step_job) or one
        # per layer; the per-step job relies on CPU program order (attention done on submit)
        self._step_job = config.speculative_job_for(self.device.type) == "step"
        if self._step_job and self.device.type != "cpu":
            raise ValueError(f'speculative_job="step" is implemented for CPU engines only '
                             f"(KV device {self.device})")
        self.host = FreeKVHostPool(num_layers, num_host_pages, num_kv_heads, config.page_size,
                                   head_dim, dtype, pin_memory)
        self.recall = FreeKVRecallEngine(self.host, k_buffers, v_buffers, device=self.device,
                                         group_blocks=recall_group_blocks)
        self.score_scale = config.score_scale_for(head_dim)  # page-softmax temperature
        dev, h, k = self.device, num_kv_heads, config.top_k
        self.t = CacheTables.create(self.g, max_reqs, max_pages_per_req, dev)
        # fmt: off
        self.residency = torch.full((num_layers, max_reqs, h, k), -1, dtype=torch.int32,
                                    device=dev)  # [L, max_reqs, H, k] logical page per slot
        # [L, host pages + 1, H, 2, D] min/max of keys; the last page is a sink that masked
        # device-side writes (the sync-free step) target instead of skipping
        self.digests = torch.zeros((num_layers, num_host_pages + 1, h, 2, head_dim),
                                   dtype=dtype, device=dev)
        self.last_q = torch.zeros((num_layers, max_reqs, num_qo_heads, head_dim), dtype=dtype,
                                  device=dev)  # [L, max_reqs, Hq, D] q of the previous step
        # host: per layer and request row, the seq_len the last speculative job served (-1)
        self.spec_valid_for = [[-1] * max_reqs for _ in range(num_layers)]
        self._flags_buf = torch.zeros((max_reqs, h), dtype=torch.bool,
                                      device=dev)  # shared per-step flags (snapshot per job)
        # fmt: on
        self._jobs: dict[int, Future[Any]] = {}
        self._step_fences: list[Any] = []  # this step's attn_done fences (step job, CPU)
        self._steps: dict[int, _LayerStep] = {}
        # CPU: the candidate window of the current step's plan, shared by its corrections
        self._window_plan: FreeKVDecodePlan | None = None
        self._window: CpuScoreWindow | None = None
        self._lock = threading.Lock()
        self._stats = {"recall_bytes": 0, "recalled_pages": 0, "checked_heads": 0,
                       "corrected_heads": 0, "job_wait_ns": 0}
        self.corrections_per_layer = [0] * num_layers
        self.checks_per_layer = [0] * num_layers
        # Step job (CPU): per layer, an average of the share of its checked requests that had
        # a drifted head, and whether the layer is in the job (config spec_drift_limit).
        self._drift = [0.0] * num_layers
        self._in_job = [True] * num_layers
        self._probe_ct = [0] * num_layers

    @property
    def req_slot_loc(self) -> torch.Tensor:
        """``[max_reqs, budget_pages]`` int64, device: first row of each budget slot."""
        return self.t.slot_loc

    @property
    def req_host_pages(self) -> torch.Tensor:
        """``[max_reqs, max_pages_per_req]`` int32, device: host page id per page (-1)."""
        return self.t.host_pages

    # ------------------------------------------------------------------ requests
    def admit(self, req_row: int, slot_loc: torch.Tensor) -> None:
        """Give request row ``req_row`` its budget slots.

        ``slot_loc``: ``[budget_pages]`` int64 (any device), first device row of each slot
        (``P`` contiguous rows each).
        """
        self.t.set_slots(req_row, slot_loc)
        self.residency[:, req_row] = -1
        self._forget_jobs(req_row)

    def commit_prefill(self, req_row: int, prompt_len: int, prompt_loc: torch.Tensor,
                       shared_pages: torch.Tensor | None = None) -> None:
        """Write the prompt through to the host tier and fill the budget slots.

        ``prompt_loc``: ``[prompt_len]`` int64, device rows of the prompt tokens in every
        layer's ``k_buffer``/``v_buffer``. ``shared_pages``: ``[f]`` int64 (cpu) host pages
        that already hold logical pages ``[0, f)`` of this prompt, full and with digests
        (a matched prefix); they get one more reference instead of a copy.
        Allocates the other ``ceil(prompt_len / P) - f`` host pages (raises
        FreeKVHostPoolFull), writes them (HND; the last one even if partial, so a prefix
        match can read it) and the digests of the full ones, and copies sink, first
        ``min(M, k)`` middle and window pages into the slots (D2D, non-dense layers).
        The engine may free ``prompt_loc`` once this returns (copies are stream ordered).
        """
        g = self.g
        n_pages = -(-prompt_len // g.page_size)
        if n_pages > self.max_pages:
            raise ValueError(f"prompt of {prompt_len} tokens needs {n_pages} pages > "
                             f"max_pages_per_req ({self.max_pages})")
        shared = (torch.empty(0, dtype=torch.int64) if shared_pages is None
                  else shared_pages.to("cpu", torch.int64))
        f = int(shared.numel())
        if f * g.page_size > prompt_len:
            raise ValueError(f"{f} shared pages exceed the prompt ({prompt_len} tokens)")
        own = self.host.alloc(req_row, n_pages - f)  # [n_pages - f] int64 cpu
        self.host.incref(shared)
        ids = torch.cat([shared, own])
        self.t.set_host_pages(req_row, ids)
        n_res = write_prompt(self, req_row, prompt_len, prompt_loc, ids, first_page=f)
        self.residency[:, req_row] = -1
        if n_res:
            self.residency[:, req_row, :, :n_res] = torch.arange(
                g.sink_pages, g.sink_pages + n_res, dtype=torch.int32, device=self.device)
        self._forget_jobs(req_row)

    def activate(self, req_row: int, seq_len: int) -> None:
        """A request whose ``seq_len`` tokens are all on the host tier (its page table set,
        its slots admitted) starts decoding: fill its budget slots from the host tier and
        set the dense-regime residency."""
        n_res = fill_slots_from_host(self, req_row, seq_len)
        self.residency[:, req_row] = -1
        if n_res:
            g = self.g
            self.residency[:, req_row, :, :n_res] = torch.arange(
                g.sink_pages, g.sink_pages + n_res, dtype=torch.int32, device=self.device)
        self._forget_jobs(req_row)

    def replace_pages(self, req_row: int, pages: torch.Tensor, host_ids: torch.Tensor) -> None:
        """Point logical ``pages`` (``[m]`` int64, cpu) of a request at other host pages
        ``host_ids`` (``[m]`` int64, cpu) holding the same tokens (a deduplicated prefix):
        one reference moves from each old page to its new one."""
        if pages.numel() == 0:
            return
        for layer in list(self._jobs):
            self._wait_job(layer)  # SYNC: a job may be reading the old pages' host blocks
        self.recall.wait_all()
        old = self.t.host_pages_cpu[req_row, pages].to(torch.int64)
        self.host.incref(host_ids)
        self.t.host_pages_cpu[req_row, pages] = host_ids.to(torch.int32)
        dev = self.t.host_pages.device
        self.t.host_pages[req_row] = self.t.host_pages_cpu[req_row].to(dev)
        self.host.decref(old[old >= 0])

    def token_host_slots(self, req_row: int, start: int, end: int) -> torch.Tensor:
        """Host token slots ``page * P + offset`` of positions ``[start, end)`` of a committed
        request: ``[end - start]`` int64, cpu (-1 where the page has no host page yet)."""
        p = self.g.page_size
        pos = torch.arange(start, end, dtype=torch.int64)
        page = self.t.host_pages_cpu[req_row, pos // p].to(torch.int64)
        return torch.where(page >= 0, page * p + pos % p, -1)

    def load_tokens(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of host token ``slots`` (``[n]`` int64, cpu) of ``layer``: two ``[n, H, D]``
        tensors on the KV device (blocking copy; used to stage a matched prefix)."""
        self.host.wait_writes()  # SYNC: a pending D2H write-through may target these pages
        p = self.g.page_size
        kv = self.host.kv[layer][slots // p, :, :, slots % p]  # [n, H, 2, D]
        kv = kv.to(self.device)
        return kv[:, :, 0], kv[:, :, 1]

    def wait_jobs(self) -> None:
        """Every speculative job submitted so far has ended, and on CUDA the current stream
        is ordered after its copies. Out of any CUDA graph (host waits)."""
        for layer in list(self._jobs):
            self._wait_job(layer)  # SYNC + STREAM: see _wait_job
        self.recall.wait_all()  # SYNC: jobs no layer waits any more (host)

    def release(self, req_row: int, kv_len: int | None = None) -> None:
        """Wait in-flight jobs, drop the row's host page references and clear its tables.

        ``kv_len``: tokens with KV of the request; when given and the last page is partial,
        that page is first written to the host tier, so token ids the engine keeps cached
        (prefix sharing) can still be read from it.
        """
        self.wait_jobs()  # a job may still scatter into this row's slots
        if kv_len is not None and kv_len % self.g.page_size:
            self._flush_partial(req_row, kv_len)
        pages = self.t.host_pages_cpu[req_row]
        self.host.decref(pages[pages >= 0])
        self.t.clear(req_row)
        self.residency[:, req_row] = -1
        self._forget_jobs(req_row)

    def close(self) -> None:
        self.recall.wait_all()
        self.recall.close()

    # ------------------------------------------------------------------ step
    def plan_decode(
        self,
        req_rows: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor | None = None,
        req_rows_cpu: torch.Tensor | None = None,
    ) -> FreeKVDecodePlan:
        """Host-side plan of one decode step (see FreeKVDecodePlan).

        ``req_rows`` ``[bs]`` int64, ``seq_lens`` ``[bs]`` int64 incl. the current token
        (KV device); ``*_cpu`` host copies if available (else copied, a sync). Allocates a
        host page for each page opened by this token (raises FreeKVHostPoolFull).
        """
        rows_d, lens_d, rows_c, n_c = self._plan_inputs(
            req_rows, seq_lens,
            req_rows_cpu if req_rows_cpu is not None else req_rows,
            seq_lens_cpu if seq_lens_cpu is not None else seq_lens)
        self.t.open_pages(self.host, rows_c, n_c)
        self._step_fences = []  # a step cut short before its last layer leaves none behind
        return build_plan(self.g, rows_c, n_c, self.t.slot_loc_cpu, self.t.host_pages_cpu,
                          self.t.host_pages, rows_d, lens_d, self.device)

    def prepare_layer(self, layer: int, plan: FreeKVDecodePlan) -> None:
        """Dense-regime window exit: copy the page leaving the ring into its retrieved slot.

        Call before the engine writes this token's K/V of ``layer`` at ``plan.token_loc``
        (that write reuses the ring slot). Rows affected are dense, so no job touches them.
        """
        if not self._is_sparse[layer] or plan.num_exit == 0:
            return
        offs = torch.arange(self.g.page_size, device=self.device)
        src = (plan.exit_src_loc[:, None] + offs).reshape(-1)  # [ne * P] rows
        dst = (plan.exit_dst_loc[:, None] + offs).reshape(-1)
        for buf in (self.k_buffers[layer], self.v_buffers[layer]):
            buf[dst] = buf[src]
        self.residency[layer][plan.exit_rows, :, plan.exit_slot] = plan.exit_page[:, None]

    def before_attention(self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor) -> None:
        """Wait the layer's speculative job, then correct flagged heads synchronously.

        ``q``: ``[bs, Hq, D]`` model dtype, post-RoPE query of this step. Host syncs: the
        job Future, and one D2H of the ``[bs, H]`` correction flags when ``tau`` is set.
        """
        if not self._is_sparse[layer]:
            return
        with single_intra_op_thread(self._host_ops):
            self._before_attention(layer, plan, q)

    def _before_attention(self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor) -> None:
        self._wait_job(layer)
        if not plan.any_sparse:
            return
        h, bs = self.num_kv_heads, plan.bs
        n_corr = n_checked = 0
        if self.cfg.speculative and not self._in_job[layer]:
            # Step job, a layer out of the job (drifts too often): select with q_t now, and
            # probe its drift every fourth step to let it rejoin.
            rows_flag = [[sp] * h for sp in plan.sparse_list]
            self._probe_ct[layer] += 1
            if self._probe_ct[layer] % 4 == 0:
                self._probe_drift(layer, plan, q)
        elif self.cfg.speculative:
            # Heads whose speculative job served this very step are checked for drift; the
            # others (new to the sparse regime, or no job yet) select with q_t now.
            valid, flags = self._drift_check(layer, plan, q)
            rows_flag = [[sp and not ok] * h for sp, ok in zip(plan.sparse_list, valid)]
            if flags is not None:
                drifted = 0
                for b, heads in enumerate(flags):
                    if valid[b]:
                        n_checked += h
                        n_corr += sum(heads)
                        drifted += any(heads)
                        rows_flag[b] = heads
                if self._step_job:
                    self._note_drift(layer, drifted / sum(valid))
        else:
            rows_flag = [[sp] * h for sp in plan.sparse_list]
        n_flag = sum(map(sum, rows_flag))
        with self._lock:
            self._stats["checked_heads"] += n_checked
            self._stats["corrected_heads"] += n_corr
            self.checks_per_layer[layer] += n_checked
            self.corrections_per_layer[layer] += n_corr
        if n_flag == 0 and self._step_job:
            return  # nothing to select, and the step job reads no flags (race 9)
        if self._step_job and self.device.type == "cpu" and bs > 1:
            # CPU step job: select and recall only the requests with a flagged head (the
            # others keep the job's selection; nothing reads this layer's sel_t later)
            self._correct_rows(layer, plan, q, rows_flag)
            return
        buf = self._flags_buf[:bs]
        # REUSE: the shared flags buffer was last read by the previous layer's head_mask
        # snapshot, enqueued on this same stream before this copy (stream order). On GPUs this
        # is a pageable H2D, as the old `.to(device)` of the host flags was.
        buf.copy_(torch.tensor(rows_flag, dtype=torch.bool).view(bs, h))
        step = _LayerStep(flags=buf)
        self._steps[layer] = step
        if n_flag == 0:
            return
        sel, scores = self._select_now(layer, plan, q)
        step.sel, step.scores = sel, scores
        end = apply_selection(self, layer, plan.req_rows, plan.slot_loc, plan.page_table, sel,
                              scores, buf, mode="sync", before_scatter=None)
        if end is not None:
            # STREAM: attention (current stream) reads the slots after the sync recall.
            torch.cuda.current_stream(self.device).wait_event(end)

    def _correct_rows(self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor,
                      rows_flag: list[list[bool]]) -> None:
        """CPU, step job: select with ``q`` and recall for the batch positions with a
        flagged head only (``rows_flag [bs][H]``; unflagged heads of those keep their
        pages through the head mask)."""
        pos = [b for b, heads in enumerate(rows_flag) if any(heads)]
        idx = torch.tensor(pos, dtype=torch.int64)
        win = self._plan_window(plan).take(idx)
        sel, scores = cpu_select_window(win, q.index_select(0, idx), self.digests[layer],
                                        self.num_kv_heads, self.cfg.top_k, self.score_scale,
                                        self.cfg.span_weight)
        mask = torch.tensor([rows_flag[b] for b in pos], dtype=torch.bool)  # [b', H]
        apply_selection(self, layer, plan.req_rows.index_select(0, idx),
                        plan.slot_loc.index_select(0, idx), plan.page_table.index_select(0, idx),
                        sel, scores, mask, mode="sync", before_scatter=None)

    def _plan_window(self, plan: FreeKVDecodePlan) -> CpuScoreWindow:
        """The CPU candidate window of ``plan`` (built at its first correction)."""
        if self._window_plan is not plan or self._window is None:  # engine thread: no lock
            ends = torch.where(plan.sparse, plan.cand_end, plan.cand_start)  # [bs] int32
            self._window = plan_cpu_window(plan.page_table, plan.cand_start, ends)
            self._window_plan = plan
        return self._window

    def _select_now(self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select ``layer``'s pages with this step's ``q`` (a correction, or a layer out of
        the job). On CPU the candidate window is planned once per step for every layer."""
        if self.device.type != "cpu":
            return select_batch(q, self.digests[layer], plan.page_table, plan.cand_start,
                                plan.cand_end, plan.sparse, self.num_kv_heads, self.cfg.top_k,
                                self.score_scale, span_weight=self.cfg.span_weight)
        return cpu_select_window(self._plan_window(plan), q, self.digests[layer],
                                 self.num_kv_heads, self.cfg.top_k, self.score_scale,
                                 self.cfg.span_weight)

    def after_attention(
        self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor, attn_done: Any = None
    ) -> None:
        """Write through completed pages, store ``last_q`` and submit the speculative job.

        ``q``: ``[bs, Hq, D]``, this step's query (the engine may reuse its memory after the
        call). ``attn_done``: optional fence ordering the job's scatter after attention
        (``torch.cuda.Event`` if attention ran on another stream; CPU: ``.wait()`` object).
        """
        if not self._is_sparse[layer]:
            return
        with single_intra_op_thread(self._host_ops):
            self._after_attention(layer, plan, q, attn_done)

    def _after_attention(
        self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor, attn_done: Any
    ) -> None:
        if plan.num_comp:
            self._write_through(layer, plan)
        if not self.cfg.speculative or not plan.any_next_sparse:
            self._steps.pop(layer, None)
            return
        self.last_q[layer].index_copy_(0, plan.req_rows, q.to(self.dtype))  # persistent
        served = self.spec_valid_for[layer]
        for r, n, nxt in zip(plan.rows_list, plan.seq_lens_list, plan.next_sparse_list):
            if nxt:
                served[r] = n + 1
        if self._step_job:
            self._steps.pop(layer, None)
            self._queue_step_job(layer, plan, attn_done)
            return
        if all(plan.next_sparse_list):  # usual case: the job covers the whole batch
            jr: torch.Tensor | None = None

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t
        else:  # [bj] batch positions sparse at seq_len + 1
            jr = torch.nonzero(plan.next_sparse_cpu).flatten().to(self.device)

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t[jr]
        rows_j = pick(plan.req_rows)
        step = self._steps.pop(layer, None)
        sel = scores = None
        head_mask: torch.Tensor | None = None
        flags_src: torch.Tensor | None = None
        if step is not None and step.sel is not None and not plan.cand_changes_next:
            # Reuse sel_t; corrected heads already hold it, so only the other heads.
            sel, scores = pick(step.sel), pick(step.scores)  # type: ignore[arg-type]
            head_mask, flags_src = self._job_head_mask(step, pick)
        q_src, q_rows = self._job_query(layer, q, plan, rows_j, jr)
        # Per-step plan tensors: fresh each step and never written after build, so the job
        # may read them without copies.
        page_table, slot_loc = pick(plan.page_table), pick(plan.slot_loc)
        cand_start, cand_end = pick(plan.cand_start), pick(plan.next_cand_end)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            # STREAM: recorded after last_q and the job inputs are written and after the
            # attention enqueued on this stream: the job stream waits it (races 5 and 6).
            ready.record(torch.cuda.current_stream(self.device))
            js = self.recall.job_stream
            for t in (rows_j, page_table, slot_loc, cand_start, cand_end, jr, q_rows, sel,
                      scores, head_mask):
                if t is not None:
                    t.record_stream(js)  # REUSE: main-stream tensors read on the job stream
        scatter_fence = self._scatter_fence(attn_done)

        def job() -> torch.cuda.Event | None:
            js = self.recall.job_stream
            with torch.cuda.stream(js) if js is not None else contextlib.nullcontext():
                if js is not None and ready is not None:
                    js.wait_event(ready)  # STREAM: q/last_q written, attention enqueued (5, 6)
                    if isinstance(scatter_fence, torch.cuda.Event):
                        js.wait_event(scatter_fence)  # STREAM: attention on another stream (5)
                s, sc, mask = sel, scores, head_mask
                if s is None:
                    qj = q_src[q_rows]  # [bj, Hq, D]
                    s, sc = select_batch(qj, self.digests[layer], page_table, cand_start,
                                         cand_end, None, self.num_kv_heads, self.cfg.top_k,
                                         self.score_scale, span_weight=self.cfg.span_weight)
                if mask is None:
                    mask = ~pick(flags_src) if flags_src is not None else torch.ones(
                        s.shape[:2], dtype=torch.bool, device=s.device)
                # CPU: the scatter waits the attn_done fence itself (CUDA: stream wait above).
                fence = scatter_fence if js is None else None
                end = apply_selection(self, layer, rows_j, slot_loc, page_table, s, sc, mask,
                                      mode="async", before_scatter=fence)
                if js is None:
                    return None
                if end is not None:
                    js.wait_event(end)  # STREAM: fold the copies into the job stream
                done = torch.cuda.Event()
                # STREAM: the residency update is on the job stream too, so always hand back an
                # event (recorded by this job, never reused: no stale wait, race 7).
                done.record(js)
                return done

        self._wait_job(layer)  # SYNC: normally a no-op; one job per layer in flight
        self._jobs[layer] = self.recall.submit(job)

    # ------------------------------------------------------------------ step job membership
    def _drift_check(self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor
                     ) -> tuple[list[bool], list[list[bool]] | None]:
        """``(valid, flags)``: per batch position, whether ``last_q`` of ``layer`` is the
        previous step's (its job served this step), and the ``[bs][H]`` correction flags
        (None when ``tau`` is off or no position is valid)."""
        served = self.spec_valid_for[layer]
        valid = [sp and served[r] == n for sp, r, n in
                 zip(plan.sparse_list, plan.rows_list, plan.seq_lens_list)]
        if self.cfg.tau is None or not any(valid):
            return valid, None
        from sglang_freekv.kernels.correct import correction_flags, cpu_drift_flags

        last_q = self.last_q[layer].index_select(0, plan.req_rows)  # [bs, Hq, D]
        if self.device.type == "cpu":  # the same flags without the checks (every layer)
            return valid, cpu_drift_flags(q, last_q, self.num_kv_heads, float(self.cfg.tau))
        corr, _ = correction_flags(q, last_q, self.num_kv_heads, float(self.cfg.tau))
        # SYNC (host-driven step only; the device step has its own flags): the flags decide
        # whether to select/recall before attention.
        return valid, corr.tolist()

    def _probe_drift(self, layer: int, plan: FreeKVDecodePlan, q: torch.Tensor) -> None:
        """Drift of a layer out of the step job (CPU): the correction check, for the
        average only (the layer selects every head with q_t)."""
        valid, flags = self._drift_check(layer, plan, q)
        if flags is not None:
            drifted = sum(any(heads) for ok, heads in zip(valid, flags) if ok)
            self._note_drift(layer, drifted / sum(valid))

    def _note_drift(self, layer: int, share: float) -> None:
        """Fold one check's share of drifted requests into the layer's average and move the
        layer out of (above ``spec_drift_limit``) or back into (below it - 0.1) the job."""
        d = self._drift[layer] = self._drift[layer] + (share - self._drift[layer]) / 8
        limit = self.cfg.spec_drift_limit
        if self._in_job[layer] and d > limit:
            self._in_job[layer] = False
        elif not self._in_job[layer] and d < limit - 0.1:
            self._in_job[layer] = True

    @property
    def speculative_layers(self) -> list[int]:
        """Sparse layers the speculative job serves (all of them unless the step job moved
        some out, see ``spec_drift_limit``)."""
        if not self.cfg.speculative:
            return []
        return [i for i in self.sparse_layers if self._in_job[i]]

    # ------------------------------------------------------------------ jobs
    def _queue_step_job(self, layer: int, plan: FreeKVDecodePlan, attn_done: Any) -> None:
        """Step job mode: keep the layer's fence; after the last sparse layer, submit the
        jobs for every sparse layer over the rows sparse at seq_len + 1.

        Every layer's ``before_attention`` of the next step waits its job's Future. Safe:
        attention of every layer of this step has run, or the job waits its ``attn_done``
        fence before any scatter (race 5); ``last_q`` of every layer is written (race 6); the
        job reads no shared flags (race 9); one ordered worker (race 8).
        """
        fence = self._scatter_fence(attn_done)
        if fence is not None:
            self._step_fences.append(fence)
        if layer != self.sparse_layers[-1]:
            return
        fences, self._step_fences = self._step_fences, []
        cols = (plan.req_rows, plan.page_table, plan.slot_loc, plan.cand_start,
                plan.next_cand_end)
        if not all(plan.next_sparse_list):  # [bj] batch positions sparse at seq_len + 1
            jr = torch.nonzero(plan.next_sparse_cpu).flatten().to(self.device)
            cols = tuple(t[jr] for t in cols)
        for lid in self.sparse_layers:
            self._wait_job(lid)  # SYNC: normally a no-op; one job in flight
        layers = self.speculative_layers  # read on this thread, after every check of the step
        if not layers:
            return
        inp = StepJobInputs(*cols, fences=fences)
        # Two jobs, in order on the one worker: the first third of the layers, then the
        # rest. The next step's first sparse layers wait only the first; the rest runs under
        # their compute (a whole job can outlast the gap between steps: float32, batches).
        # Each layer's state is touched by the engine only after its own job (race 7).
        cut = max(1, len(layers) // 3)
        for part in (layers[:cut], layers[cut:]):
            if part:
                fut = self.recall.submit(lambda part=part: run_step_job(self, part, inp))
                for lid in part:
                    self._jobs[lid] = fut

    # ------------------------------------------------------------------ internals
    def _forget_jobs(self, req_row: int) -> None:
        """No speculative job has served row ``req_row`` (a new or released request)."""
        for served in self.spec_valid_for:
            served[req_row] = -1

    def _wait_job(self, layer: int) -> None:
        fut = self._jobs.pop(layer, None)
        if fut is None:
            return
        # SYNC: host waits the worker's Future first, so the event below is this job's own
        # record and never a stale one from an earlier step (race 7).
        t0 = time.perf_counter_ns()
        event = fut.result()
        waited = time.perf_counter_ns() - t0
        with self._lock:
            self._stats["job_wait_ns"] += waited
        if event is not None:
            # STREAM: the compute stream waits the job's copies/scatters on the GPU.
            torch.cuda.current_stream(self.device).wait_event(event)

    # The protections of races 5, 6, 9 and 10 (module docstring), one method each.
    def _plan_inputs(self, req_rows: torch.Tensor, seq_lens: torch.Tensor,
                     req_rows_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan's own int64 copies of the engine's ``[bs]`` request rows and seq_lens (on
        the KV device, then on the host), race 10: ``Tensor.to`` returns its input itself when
        nothing changes (a CPU engine's tensors; CUDA tensors already on the device), and the
        engine rewrites those tensors for its next forward while a job of this step may still
        read the plan. On CUDA the device copies are enqueued on the current stream (no sync).
        """
        return (req_rows.to(self.device, torch.int64, copy=True),
                seq_lens.to(self.device, torch.int64, copy=True),
                req_rows_cpu.to("cpu", torch.int64, copy=True),
                seq_lens_cpu.to("cpu", torch.int64, copy=True))

    def _scatter_fence(self, attn_done: Any) -> Any:
        """The fence the speculative scatter waits (race 5): attention's ``attn_done``."""
        return attn_done

    def _job_query(self, layer: int, q: torch.Tensor, plan: FreeKVDecodePlan,
                   rows_j: torch.Tensor, jr: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the per-layer job selects with (race 6): the persistent ``last_q`` of the
        layer (written before the job is submitted), indexed by request row."""
        return self.last_q[layer], rows_j

    def _job_head_mask(self, step: _LayerStep, pick: Any
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(head_mask, flags_source)`` of a job reusing ``sel_t`` (race 9): a new tensor,
        snapshotted now, so a later layer's flags cannot leak in."""
        return ~pick(step.flags), None

    def device_tensors(self) -> list[torch.Tensor]:
        """The tensors this cache keeps on its device (for memory accounting)."""
        out = [self.residency, self.digests, self.last_q, self._flags_buf, self.t.slot_loc,
               self.t.host_pages]
        out += self.recall.device_tensors()
        return [t for t in out if t.device.type == self.device.type]

    def _write_through(self, layer: int, plan: FreeKVDecodePlan) -> None:
        from sglang_freekv.kernels.digest import page_digest
        from sglang_freekv.kernels.scatter import backup_gather

        kb, vb = self.k_buffers[layer], self.v_buffers[layer]
        blocks = backup_gather(kb, vb, plan.comp_src_loc, self.g.page_size)  # [nc,H,2,P,D]
        self.host.write_blocks(layer, plan.comp_host_ids_cpu, blocks)
        dig = page_digest(kb, plan.comp_src_loc, self.g.page_size)  # [nc, H, 2, D]
        self.digests[layer].index_copy_(0, plan.comp_host_ids, dig)

    def _flush_partial(self, req_row: int, kv_len: int) -> None:
        """Write the partial last page (in its sink or window slot) to its host page."""
        from sglang_freekv.kernels.scatter import backup_gather
        from sglang_freekv.layout import page_slot

        page = (kv_len - 1) // self.g.page_size
        host_id = self.t.host_pages_cpu[req_row, page].to(torch.int64).reshape(1)
        if int(host_id) < 0:
            return
        slot = page_slot(torch.tensor([page]), self.g)
        src = self.t.slot_loc_cpu[req_row, slot].to(self.device)  # [1] first row
        for layer in self.sparse_layers:
            kb, vb = self.k_buffers[layer], self.v_buffers[layer]
            # STREAM: the gather is a copy enqueued on the current stream before the slot rows
            # can be handed to another request (also current-stream work), and write_blocks'
            # backup stream waits the current stream before its D2H of that copy.
            self.host.write_blocks(layer, host_id, backup_gather(kb, vb, src, self.g.page_size))

    def add_recall_stats(self, n_blocks: int) -> None:
        with self._lock:
            self._stats["recalled_pages"] += n_blocks
            self._stats["recall_bytes"] += n_blocks * self.recall.block_bytes

    def stats(self) -> dict[str, Any]:
        """Counters: recall_bytes, recalled_pages (page-head blocks), checked_heads,
        corrected_heads, job_wait_ns (host time the calling threads spent waiting speculative
        jobs), host_pages_used, and per-layer checks/corrections."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["corrections_per_layer"] = list(self.corrections_per_layer)
            out["checks_per_layer"] = list(self.checks_per_layer)
        out["speculative_layers"] = len(self.speculative_layers)
        out["host_pages_used"] = self.host.used_pages
        return out
