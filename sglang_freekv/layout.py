"""Slot and page index math of the FreeKV budget (docs/design.md "Memory" and "Per request").

Dims glossary (used in every docstring of the core):

==================  ==========================================================================
``bs``              requests in the decode batch
``Hq``              ``num_qo_heads``; ``H`` = ``num_kv_heads``; ``group_size`` = Hq / H
``D``               ``head_dim``
``P``               ``page_size`` (tokens per page)
``L``               ``num_layers``
``ns``/``nw``       ``sink_pages`` / ``window_pages``
``k``               ``top_k`` = budget_pages - ns - nw (retrieved slots per request and head)
``n``               seq_len of a request, the current decode token included
``n_pages``         ceil(n / P); the last page may be partial
``M``               middle pages = max(0, n_pages - ns - nw); *sparse* iff M > k
==================  ==========================================================================

Layouts: device KV is **NHD** (``k_buffer[layer]`` is ``[rows, H, D]``, a page is ``P``
contiguous rows); host KV is **HND** (one contiguous ``[2, P, D]`` block per (page, head)).

Budget slots of a request (``budget_pages`` slots, slot ``s`` = ``P`` rows starting at
``req_slot_loc[r, s]``): ``[0, ns)`` sink (page ``p`` in slot ``p``), ``[ns, ns + k)``
retrieved (per-head content given by ``residency``), ``[ns + k, budget_pages)`` the window
ring (page ``p`` in slot ``ns + k + p % nw``).

Everything here is pure torch, vectorized over the batch (no per-page / per-head loop), and
works on CPU and CUDA tensors alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_freekv.config import FreeKVConfig

__all__ = [
    "BudgetGeometry",
    "budget_attention_indices",
    "budget_attention_table",
    "candidate_range",
    "dense_attention_indices",
    "num_pages",
    "page_slot",
    "token_loc",
    "window_slot",
]


@dataclass(frozen=True, slots=True)
class BudgetGeometry:
    """The page counts of the budget, from a :class:`FreeKVConfig`."""

    page_size: int  # P
    sink_pages: int  # ns
    top_k: int  # k
    window_pages: int  # nw
    budget_pages: int  # ns + k + nw

    @classmethod
    def of(cls, cfg: FreeKVConfig) -> BudgetGeometry:
        return cls(cfg.page_size, cfg.sink_pages, cfg.top_k, cfg.window_pages, cfg.budget_pages)


def num_pages(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """``ceil(seq_lens / P)``; same shape, dtype and device as ``seq_lens`` (int)."""
    return (seq_lens + page_size - 1) // page_size


def window_slot(page: torch.Tensor, g: BudgetGeometry) -> torch.Tensor:
    """Ring slot ``ns + k + p % nw`` of window page ``page`` (any int tensor, same shape)."""
    return g.sink_pages + g.top_k + page % g.window_pages


def page_slot(page: torch.Tensor, g: BudgetGeometry) -> torch.Tensor:
    """Slot of a *sink or window* page ``page`` (any int tensor): ``p`` if ``p < ns`` else its
    ring slot. Middle pages have no fixed slot (see ``residency``)."""
    return torch.where(page < g.sink_pages, page, window_slot(page, g))


def candidate_range(
    seq_lens: torch.Tensor, g: BudgetGeometry
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Middle (candidate) pages ``[ns, n_pages - nw)`` of each request.

    Parameters
    ----------
    seq_lens : ``[bs]`` int, any device; seq_len incl. the current token.

    Returns ``(cand_start, cand_end, sparse)``: ``[bs]`` int32, ``[bs]`` int32 (>= cand_start),
    ``[bs]`` bool (M > k), all on ``seq_lens.device``.
    """
    n_pages = num_pages(seq_lens.to(torch.int64), g.page_size)
    start = torch.full_like(n_pages, g.sink_pages)
    end = torch.maximum(n_pages - g.window_pages, start)  # [bs]
    sparse = (end - start) > g.top_k
    return start.to(torch.int32), end.to(torch.int32), sparse


def token_loc(
    slot_loc: torch.Tensor, seq_lens: torch.Tensor, g: BudgetGeometry
) -> torch.Tensor:
    """Device row where the current token (position ``n - 1``) goes.

    Parameters
    ----------
    slot_loc : ``[bs, budget_pages]`` int64, first row of each slot of the batch's requests.
    seq_lens : ``[bs]`` int64, same device.

    Returns ``[bs]`` int64: ``slot_loc[b, page_slot((n-1)//P)] + (n-1) % P``.
    """
    pos = seq_lens.to(torch.int64) - 1
    page = pos // g.page_size
    slot = page_slot(page, g)  # [bs]
    first = torch.gather(slot_loc, 1, slot[:, None]).squeeze(1)  # [bs] int64
    return first + pos % g.page_size


def _attended_slots(
    seq_lens: torch.Tensor, g: BudgetGeometry
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots attended by each request, in attention order, padded with 0.

    Returns ``(slots [bs, budget_pages] int64, num_slots [bs] int64, kv_lens [bs] int64)``.
    Order: sink pages ``< min(ns, n_pages)``, the first ``min(M, k)`` retrieved slots, then the
    window pages in logical order (the last one partial).
    """
    n = seq_lens.to(torch.int64)
    n_pages = num_pages(n, g.page_size)  # [bs]
    n_sink = torch.clamp(n_pages, max=g.sink_pages)
    n_mid = torch.clamp(n_pages - g.sink_pages - g.window_pages, min=0)
    n_ret = torch.clamp(n_mid, max=g.top_k)
    win_start = torch.clamp(n_pages - g.window_pages, min=g.sink_pages)
    n_win = torch.clamp(n_pages - win_start, min=0)
    total = n_sink + n_ret + n_win  # [bs]
    i = torch.arange(g.budget_pages, device=n.device)[None, :]  # [1, budget_pages]
    ns_, nr_ = n_sink[:, None], n_ret[:, None]
    ret_slot = g.sink_pages + (i - ns_)
    win_page = win_start[:, None] + (i - ns_ - nr_)
    slots = torch.where(
        i < ns_, i, torch.where(i < ns_ + nr_, ret_slot, window_slot(win_page, g))
    )
    slots = torch.where(i < total[:, None], slots, torch.zeros_like(slots))  # [bs, budget_pages]
    kv_lens = torch.clamp(total - 1, min=0) * g.page_size + (n - (n_pages - 1) * g.page_size)
    return slots, total, kv_lens


def _rows_from_pages(
    first_rows: torch.Tensor, kv_lens: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ``[bs, pages]`` first rows into the ragged row list.

    Returns ``(kv_indptr [bs+1] int32, kv_indices [sum(kv_lens)] int64)``.
    """
    bs, width = first_rows.shape
    offs = torch.arange(page_size, device=first_rows.device)
    rows = (first_rows[:, :, None] + offs).reshape(bs, width * page_size)  # [bs, width*P]
    pos = torch.arange(width * page_size, device=first_rows.device)[None, :]
    kv_indices = rows[pos < kv_lens[:, None]]  # row-major: request by request, in order
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=first_rows.device)
    kv_indptr[1:] = torch.cumsum(kv_lens, 0).to(torch.int32)
    return kv_indptr, kv_indices


def budget_attention_indices(
    req_slot_loc: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    cfg: FreeKVConfig | BudgetGeometry,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention row list over the budget slots (head independent).

    Which retrieved slots are valid is the same for every KV head (the first ``min(M, k)``),
    so one row list serves all heads; the per-head content differs (``residency``).

    Parameters
    ----------
    req_slot_loc : ``[max_reqs, budget_pages]`` int64, first device row of each slot.
    req_rows : ``[bs]`` int64, request rows of the batch (same device).
    seq_lens : ``[bs]`` int64, seq_len incl. the current token (same device).

    Returns ``(kv_indptr [bs+1] int32, kv_indices [sum kv_lens] int64, kv_lens [bs] int32)``.
    Note: the boolean-mask compaction syncs on CUDA; call it from ``plan`` only.
    """
    g = cfg if isinstance(cfg, BudgetGeometry) else BudgetGeometry.of(cfg)
    slots, _, kv_lens = _attended_slots(seq_lens, g)
    first = torch.gather(req_slot_loc[req_rows], 1, slots)  # [bs, budget_pages] int64
    kv_indptr, kv_indices = _rows_from_pages(first, kv_lens, g.page_size)
    return kv_indptr, kv_indices, kv_lens.to(torch.int32)


def budget_attention_table(
    slot_loc: torch.Tensor, seq_lens: torch.Tensor, g: BudgetGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rows over the budget slots as a padded table (no compaction, no sync).

    The table plays SGLang's ``req_to_token`` for the wrapped attention backend: row ``b``'s
    first ``kv_lens[b]`` entries are the device rows attended, in attention order (as
    :func:`budget_attention_indices`); later entries are valid rows never read.

    Parameters
    ----------
    slot_loc : ``[bs, budget_pages]`` int64, first device row of each slot of the batch.
    seq_lens : ``[bs]`` int64, seq_len incl. the current token (same device).

    Returns ``(table [bs, budget_pages * P] int32, kv_lens [bs] int32)``, same device.
    """
    slots, _, kv_lens = _attended_slots(seq_lens, g)
    first = torch.gather(slot_loc, 1, slots)  # [bs, budget_pages] int64
    offs = torch.arange(g.page_size, device=first.device)
    table = (first[:, :, None] + offs).reshape(first.shape[0], -1)  # [bs, budget] int64
    return table.to(torch.int32), kv_lens.to(torch.int32)


def dense_attention_indices(
    req_to_token: torch.Tensor, req_rows: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row list of plain dense attention (reference / tests).

    ``req_to_token`` ``[max_reqs, max_len]`` int64 rows of every token position.
    Returns ``(kv_indptr [bs+1] int32, kv_indices int64, kv_lens [bs] int32)``.
    """
    n = seq_lens.to(torch.int64)
    width = int(n.max()) if n.numel() else 0
    rows = req_to_token[req_rows][:, :width]  # [bs, width]
    pos = torch.arange(width, device=n.device)[None, :]
    kv_indices = rows[pos < n[:, None]]
    kv_indptr = torch.zeros(n.numel() + 1, dtype=torch.int32, device=n.device)
    kv_indptr[1:] = torch.cumsum(n, 0).to(torch.int32)
    return kv_indptr, kv_indices, n.to(torch.int32)
