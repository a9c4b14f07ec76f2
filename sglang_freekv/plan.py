"""FreeKVDecodePlan: host-side per-step metadata (built once per decode step by FreeKVCache).

Built on the CPU from the host mirrors of the slot and page tables (no device sync), then
moved to the device in one go. Graph capture is not supported (the plan is data dependent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_freekv.layout import (
    BudgetGeometry,
    budget_attention_indices,
    budget_attention_table,
    candidate_range,
    page_slot,
    token_loc,
)

__all__ = ["FreeKVDecodePlan", "build_plan"]


@dataclass(slots=True)
class FreeKVDecodePlan:
    """Per-step plan. ``_cpu`` fields are on the host, the others on the KV device."""

    # fmt: off
    bs: int
    req_rows: torch.Tensor          # [bs] int64, request rows
    req_rows_cpu: torch.Tensor      # [bs] int64, cpu
    seq_lens: torch.Tensor          # [bs] int64, seq_len incl. the current token
    seq_lens_cpu: torch.Tensor      # [bs] int64, cpu
    token_loc: torch.Tensor         # [bs] int64, device row of the current token (all layers)
    kv_indptr: torch.Tensor         # [bs + 1] int32, attention over budget rows
    kv_indices: torch.Tensor        # [kv_indptr[-1]] int64, device rows
    kv_lens: torch.Tensor           # [bs] int32
    kv_lens_cpu: torch.Tensor       # [bs] int32, cpu
    kv_table: torch.Tensor          # [bs, budget] int32, rows in attention order (padded)
    slot_loc: torch.Tensor          # [bs, budget_pages] int64, first row of each slot
    page_table: torch.Tensor        # [bs, max_pages] int32, host page id per logical page
    cand_start: torch.Tensor        # [bs] int32, candidates [start, end) at seq_len
    cand_end: torch.Tensor          # [bs] int32
    sparse: torch.Tensor            # [bs] bool, M > k at seq_len
    sparse_cpu: torch.Tensor        # [bs] bool, cpu
    any_sparse: bool
    rows_list: list[int]            # req_rows_cpu as a list (host bookkeeping per layer)
    seq_lens_list: list[int]        # seq_lens_cpu as a list
    sparse_list: list[bool]         # sparse_cpu as a list
    next_sparse_list: list[bool]    # next_sparse_cpu as a list
    next_cand_end: torch.Tensor     # [bs] int32, candidates of seq_len + 1
    next_sparse_cpu: torch.Tensor   # [bs] bool, cpu: sparse at seq_len + 1
    any_next_sparse: bool
    cand_changes_next: bool         # some row sparse at seq_len+1 has another range than now
    exit_src_loc: torch.Tensor      # [ne] int64, ring slot of the page leaving the window
    exit_dst_loc: torch.Tensor      # [ne] int64, its retrieved slot (dense regime)
    exit_rows: torch.Tensor         # [ne] int64, request rows
    exit_slot: torch.Tensor         # [ne] int64, retrieved slot index j
    exit_page: torch.Tensor         # [ne] int32, logical page
    num_exit: int
    comp_src_loc: torch.Tensor      # [nc] int64, slot of each page completed by this token
    comp_host_ids: torch.Tensor     # [nc] int64, its host page id
    comp_host_ids_cpu: torch.Tensor # [nc] int64, cpu
    num_comp: int
    # fmt: on


def build_plan(
    g: BudgetGeometry,
    req_rows_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    slot_loc_cpu: torch.Tensor,
    host_pages_cpu: torch.Tensor,
    host_pages_dev: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    device: torch.device,
) -> FreeKVDecodePlan:
    """Assemble the plan (host pages of newly opened pages must already be allocated).

    ``slot_loc_cpu [max_reqs, budget_pages] int64`` and ``host_pages_cpu [max_reqs,
    max_pages] int32`` are the host mirrors; ``host_pages_dev`` the device table.
    """
    p = g.page_size
    rows, n = req_rows_cpu, seq_lens_cpu
    bs = int(rows.numel())
    slot_loc_c = slot_loc_cpu[rows]  # [bs, budget_pages] int64
    tok = token_loc(slot_loc_c, n, g)  # [bs]
    kv_indptr, kv_indices, kv_lens = budget_attention_indices(slot_loc_cpu, rows, n, g)
    kv_table, _ = budget_attention_table(slot_loc_c, n, g)
    cs, ce, sparse = candidate_range(n, g)
    _, nce, nsparse = candidate_range(n + 1, g)
    # Dense-regime window exit: the token opening page p_new evicts p_new - nw from the ring.
    pos = n - 1
    p_new = pos // p
    p_old = p_new - g.window_pages
    j = p_old - g.sink_pages
    ex = (pos % p == 0) & (p_old >= g.sink_pages) & (j < g.top_k)  # [bs] bool
    ex_idx = torch.nonzero(ex).flatten()
    ring = g.sink_pages + g.top_k + p_new % g.window_pages
    ex_src = torch.gather(slot_loc_c, 1, ring[:, None]).squeeze(1)[ex_idx]
    ex_dst = torch.gather(slot_loc_c, 1, (g.sink_pages + j.clamp(0, g.top_k - 1))[:, None])
    ex_dst = ex_dst.squeeze(1)[ex_idx]
    # Pages completed by this token: written through (host + digest) after attention.
    comp = n % p == 0
    comp_idx = torch.nonzero(comp).flatten()
    p_c = n // p - 1
    comp_src = torch.gather(slot_loc_c, 1, page_slot(p_c.clamp(min=0), g)[:, None])
    comp_src = comp_src.squeeze(1)[comp_idx]
    comp_ids = host_pages_cpu[rows[comp_idx], p_c[comp_idx]].to(torch.int64)
    changes = bool((nsparse & (nce != ce)).any())

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return FreeKVDecodePlan(
        bs=bs,
        req_rows=req_rows,
        req_rows_cpu=rows,
        seq_lens=seq_lens,
        seq_lens_cpu=n,
        token_loc=dev(tok),
        kv_indptr=dev(kv_indptr),
        kv_indices=dev(kv_indices),
        kv_lens=dev(kv_lens),
        kv_lens_cpu=kv_lens,
        kv_table=dev(kv_table),
        slot_loc=dev(slot_loc_c),
        page_table=host_pages_dev[req_rows],
        cand_start=dev(cs),
        cand_end=dev(ce),
        sparse=dev(sparse),
        sparse_cpu=sparse,
        any_sparse=bool(sparse.any()),
        rows_list=rows.tolist(),
        seq_lens_list=n.tolist(),
        sparse_list=sparse.tolist(),
        next_sparse_list=nsparse.tolist(),
        next_cand_end=dev(nce),
        next_sparse_cpu=nsparse,
        any_next_sparse=bool(nsparse.any()),
        cand_changes_next=changes,
        exit_src_loc=dev(ex_src),
        exit_dst_loc=dev(ex_dst),
        exit_rows=dev(rows[ex_idx]),
        exit_slot=dev(j[ex_idx]),
        exit_page=dev(p_old[ex_idx].to(torch.int32)),
        num_exit=int(ex_idx.numel()),
        comp_src_loc=dev(comp_src),
        comp_host_ids=dev(comp_ids),
        comp_host_ids_cpu=comp_ids,
        num_comp=int(comp_idx.numel()),
    )
