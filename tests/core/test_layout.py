"""Slot math of layout.py against a per-request Python spelling of design.md."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.layout import (
    BudgetGeometry,
    budget_attention_indices,
    candidate_range,
    dense_attention_indices,
    page_slot,
    token_loc,
    window_slot,
)

from .conftest import make_cfg


def _spec_rows(g: BudgetGeometry, slot_loc: list[int], n: int) -> list[int]:
    """design.md "Per request": sink slots, first min(M, k) retrieved slots, window pages."""
    p = g.page_size
    n_pages = -(-n // p)
    m = max(0, n_pages - g.sink_pages - g.window_pages)
    slots = list(range(min(g.sink_pages, n_pages)))
    slots += [g.sink_pages + j for j in range(min(m, g.top_k))]
    slots += [g.sink_pages + g.top_k + q % g.window_pages
              for q in range(max(g.sink_pages, n_pages - g.window_pages), n_pages)]
    rows: list[int] = []
    for i, s in enumerate(slots):
        count = n - (n_pages - 1) * p if i == len(slots) - 1 else p
        rows += [slot_loc[s] + t for t in range(count)]
    return rows


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("sink,k,window", [(1, 3, 2), (2, 5, 3), (0, 4, 2)])
def test_budget_rows_match_spec(page_size: int, sink: int, k: int, window: int) -> None:
    g = BudgetGeometry.of(make_cfg(page_size, sink=sink, k=k, window=window))
    max_reqs = 5
    gen = torch.Generator().manual_seed(3)
    base = torch.randperm(max_reqs * g.budget_pages, generator=gen) * page_size
    req_slot_loc = base.view(max_reqs, g.budget_pages).to(torch.int64)
    rows = torch.tensor([3, 0, 4, 1])
    lens = torch.tensor([1, page_size * 2, page_size * 20 + 5, page_size * (sink + k + window) + 1])
    indptr, indices, kv_lens = budget_attention_indices(req_slot_loc, rows, lens, g)
    assert indptr.dtype == torch.int32 and kv_lens.dtype == torch.int32
    assert indices.dtype == torch.int64
    for b in range(rows.numel()):
        want = _spec_rows(g, req_slot_loc[rows[b]].tolist(), int(lens[b]))
        got = indices[indptr[b]:indptr[b + 1]].tolist()
        assert got == want, f"request {b}"
        assert int(kv_lens[b]) == len(want)
    # token_loc is the last attended row (the current token).
    tok = token_loc(req_slot_loc[rows], lens, g)
    assert tok.tolist() == [int(indices[int(indptr[b + 1]) - 1]) for b in range(rows.numel())]


def test_candidates_and_slots() -> None:
    g = BudgetGeometry.of(make_cfg(16, sink=1, k=3, window=2))
    n = torch.tensor([1, 16, 17, 64, 65, 97, 1000])
    start, end, sparse = candidate_range(n, g)
    n_pages = (n + 15) // 16
    assert start.tolist() == [1] * 7
    assert end.tolist() == torch.clamp(n_pages - 2, min=1).tolist()
    assert sparse.tolist() == ((end - start) > 3).tolist()
    pages = torch.arange(40)
    win = window_slot(pages, g)
    assert bool(((win >= 4) & (win < 6)).all())
    # any nw consecutive pages use distinct ring slots
    assert all(len(set(win[i:i + 2].tolist())) == 2 for i in range(39))
    assert page_slot(torch.tensor([0]), g).tolist() == [0]


def test_dense_indices() -> None:
    req_to_token = torch.arange(30).view(3, 10)
    indptr, indices, lens = dense_attention_indices(req_to_token, torch.tensor([2, 0]),
                                                    torch.tensor([3, 5]))
    assert indptr.tolist() == [0, 3, 8] and lens.tolist() == [3, 5]
    assert indices.tolist() == [20, 21, 22, 0, 1, 2, 3, 4]
