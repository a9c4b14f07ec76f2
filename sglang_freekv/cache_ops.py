"""Helpers of FreeKVCache: slot/page tables (device + host mirror), prompt commit, and
applying a selection (residency diff -> recall list -> copies).

Split from cache.py to keep files small; nothing here is public API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sglang_freekv.layout import BudgetGeometry
from sglang_freekv.pool_host import FreeKVHostPool
from sglang_freekv.retrieval import LIST_WALK_MAX_ROWS, diff_walk, residency_diff

if TYPE_CHECKING:
    from sglang_freekv.cache import FreeKVCache

__all__ = ["CacheTables", "apply_selection", "fill_slots_from_host", "write_prompt"]


@dataclass(slots=True)
class CacheTables:
    """Per-request tables; the ``_cpu`` mirrors let ``plan_decode`` run without syncs."""

    # fmt: off
    g: BudgetGeometry
    slot_loc: torch.Tensor        # [max_reqs, budget_pages] int64, device: first row of slot
    slot_loc_cpu: torch.Tensor    # same, cpu
    host_pages: torch.Tensor      # [max_reqs, max_pages] int32, device: host id per page (-1)
    host_pages_cpu: torch.Tensor  # same, cpu
    # fmt: on

    @classmethod
    def create(cls, g: BudgetGeometry, max_reqs: int, max_pages: int,
               device: torch.device) -> CacheTables:
        slot = torch.zeros((max_reqs, g.budget_pages), dtype=torch.int64)
        pages = torch.full((max_reqs, max_pages), -1, dtype=torch.int32)
        return cls(g, slot.to(device), slot, pages.to(device), pages.clone())

    def set_slots(self, row: int, slot_loc: torch.Tensor) -> None:
        if slot_loc.shape != (self.g.budget_pages,):
            raise ValueError(f"Invalid shape of slot_loc: expected ({self.g.budget_pages},), "
                             f"got {tuple(slot_loc.shape)}")
        loc = slot_loc.to("cpu", torch.int64)
        self.slot_loc_cpu[row] = loc
        self.slot_loc[row] = loc.to(self.slot_loc.device)

    def set_host_pages(self, row: int, ids: torch.Tensor) -> None:
        n = int(ids.numel())
        self.host_pages_cpu[row] = -1
        self.host_pages_cpu[row, :n] = ids.to(torch.int32)
        self.host_pages[row] = self.host_pages_cpu[row].to(self.host_pages.device)

    def clear(self, row: int) -> None:
        self.host_pages_cpu[row] = -1
        self.host_pages[row] = -1
        self.slot_loc_cpu[row] = 0
        self.slot_loc[row] = 0

    def open_pages(self, host: FreeKVHostPool, rows: torch.Tensor, n: torch.Tensor) -> None:
        """Allocate a host page for each page opened by the current token (vectorized)."""
        p_new = (n - 1) // self.g.page_size  # [bs] page of the current token
        if bool((p_new >= self.host_pages_cpu.shape[1]).any()):
            raise ValueError(f"seq_len {int(n.max())} exceeds max_pages_per_req "
                             f"({self.host_pages_cpu.shape[1]}) * page_size")
        need = self.host_pages_cpu[rows, p_new] < 0  # [bs] bool
        if not bool(need.any()):
            return
        r, p = rows[need], p_new[need]
        ids = host.alloc_each(r).to(torch.int32)  # raises FreeKVHostPoolFull
        self.host_pages_cpu[r, p] = ids
        dev = self.host_pages.device
        self.host_pages[r.to(dev), p.to(dev)] = ids.to(dev)


def write_prompt(cache: FreeKVCache, row: int, prompt_len: int, prompt_loc: torch.Tensor,
                 ids: torch.Tensor, first_page: int = 0) -> int:
    """Prompt -> host (pages ``>= first_page``, HND, the last even if partial) + digests of
    the full ones + budget slots, for every non-dense layer.

    Returns ``min(M, k)``, the number of retrieved slots filled (dense-regime content).
    """
    from sglang_freekv.kernels.digest import page_digest
    from sglang_freekv.kernels.scatter import backup_gather

    g, dev = cache.g, cache.device
    p = g.page_size
    n_pages = -(-prompt_len // p)
    full = prompt_len // p
    n_sink = min(g.sink_pages, n_pages)
    n_res = min(max(0, n_pages - g.sink_pages - g.window_pages), g.top_k)
    # Window pages start after the sink; a prompt shorter than the sink has none.
    win_start = min(max(g.sink_pages, n_pages - g.window_pages), n_pages)
    ar = torch.arange
    pages = torch.cat([ar(n_sink), ar(g.sink_pages, g.sink_pages + n_res),
                       ar(win_start, n_pages)])  # [npc] logical pages to place
    slots = torch.cat([ar(n_sink), g.sink_pages + ar(n_res),
                       g.sink_pages + g.top_k + ar(win_start, n_pages) % g.window_pages])
    pos = pages[:, None] * p + ar(p)  # [npc, P] token positions
    valid = pos < prompt_len
    loc = prompt_loc.to(dev, torch.int64)
    src = loc[pos[valid].to(dev)]  # rows of the prompt
    first = cache.t.slot_loc_cpu[row, slots]  # [npc]
    dst = (first[:, None] + ar(p))[valid].to(dev)  # rows of the budget slots
    # Host pages [first_page, n_pages): rows gathered contiguously, a partial last page padded
    # by repeating its last row (those rows are overwritten when the page completes).
    wpos = ar(first_page * p, n_pages * p).clamp(max=prompt_len - 1).to(dev)
    n_w = n_pages - first_page
    n_full = full - first_page  # full pages among them
    starts = torch.arange(n_w, device=dev) * p  # first rows in the gathered copy
    for layer in cache.sparse_layers:
        kb, vb = cache.k_buffers[layer], cache.v_buffers[layer]
        if n_w > 0:
            kf, vf = kb[loc[wpos]], vb[loc[wpos]]  # [n_w*P, H, D]
            blocks = backup_gather(kf, vf, starts, p)  # [n_w, H, 2, P, D] HND
            cache.host.write_blocks(layer, ids[first_page:], blocks)
            if n_full > 0:
                dig = page_digest(kf, starts[:n_full], p)  # [n_full, H, 2, D]
                cache.digests[layer].index_copy_(0, ids[first_page:full].to(dev), dig)
        kb[dst] = kb[src]
        vb[dst] = vb[src]
    return n_res


def _slot_pages(g: BudgetGeometry, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logical pages resident right after prefill (sink, first ``min(M, k)`` middle pages,
    window) and their slots, for a request of ``n`` tokens: ``([npc], [npc], min(M, k))``."""
    p = g.page_size
    n_pages = -(-n // p)
    n_sink = min(g.sink_pages, n_pages)
    n_res = min(max(0, n_pages - g.sink_pages - g.window_pages), g.top_k)
    win_start = min(max(g.sink_pages, n_pages - g.window_pages), n_pages)
    ar = torch.arange
    pages = torch.cat([ar(n_sink), ar(g.sink_pages, g.sink_pages + n_res), ar(win_start, n_pages)])
    slots = torch.cat([ar(n_sink), g.sink_pages + ar(n_res),
                       g.sink_pages + g.top_k + ar(win_start, n_pages) % g.window_pages])
    return pages, slots, n_res


def fill_slots_from_host(cache: FreeKVCache, row: int, n: int) -> int:
    """Budget slots of request ``row`` (``n`` tokens, all on the host tier) from the host tier:
    sink, first ``min(M, k)`` middle and window pages, every sparse layer, every head.
    Returns ``min(M, k)`` (the dense-regime retrieved pages placed). Host work + one copy per
    layer (out of any CUDA graph: a request's first decode step plans it)."""
    g, dev, p = cache.g, cache.device, cache.g.page_size
    pages, slots, n_res = _slot_pages(g, n)
    host_ids = cache.t.host_pages_cpu[row, pages].to(torch.int64)  # [npc]
    if bool((host_ids < 0).any()):
        raise RuntimeError(f"freekv: request row {row} has a page without a host copy")
    first = cache.t.slot_loc_cpu[row, slots]  # [npc]
    rows = (first[:, None] + torch.arange(p)).reshape(-1).to(dev)  # [npc * P]
    cache.host.wait_writes()  # SYNC: pages written through by D2H must have landed
    h, d = cache.num_kv_heads, cache.head_dim
    for layer in cache.sparse_layers:
        blocks = cache.host.kv[layer][host_ids].to(dev)  # [npc, H, 2, P, D]
        kb, vb = cache.k_buffers[layer], cache.v_buffers[layer]
        kb[rows] = blocks[:, :, 0].permute(0, 2, 1, 3).reshape(-1, h, d)  # [npc * P, H, D]
        vb[rows] = blocks[:, :, 1].permute(0, 2, 1, 3).reshape(-1, h, d)
    return n_res


def apply_selection(
    cache: FreeKVCache,
    layer: int,
    rows: torch.Tensor,
    slot_loc: torch.Tensor,
    page_table: torch.Tensor,
    sel: torch.Tensor,
    scores: torch.Tensor,
    head_mask: torch.Tensor,
    *,
    mode: str,
    before_scatter: Any,
) -> torch.cuda.Event | None:
    """Residency diff for ``rows`` then recall the new (page, head) blocks.

    Shapes: ``rows [b] int64``, ``slot_loc [b, budget_pages] int64``, ``page_table [b,
    max_pages] int32``, ``sel``/``scores [b, H, k]``, ``head_mask [b, H] bool`` (device).
    Runs on the calling thread's current stream; one host sync (the recall list D2H).
    Returns the recall's end event on CUDA (None on CPU or when nothing was recalled).
    """
    res = cache.residency[layer][rows]  # [b, H, k] int32
    if cache.device.type == "cpu" and sel.shape[0] * sel.shape[1] <= LIST_WALK_MAX_ROWS:
        _apply_walk(cache, layer, rows, slot_loc, page_table, sel, scores, res, head_mask,
                    mode=mode, before_scatter=before_scatter)
        return None
    rl, new_res = residency_diff(sel, scores, res, head_mask)
    cache.residency[layer].index_copy_(0, rows, new_res)
    if rl.batch.numel() == 0:
        return None
    host_ids = page_table[rl.batch, rl.page.clamp(min=0)].to(torch.int64)  # [N]
    dst_loc = slot_loc[rl.batch, cache.g.sink_pages + rl.slot]  # [N] int64
    # SYNC: the host needs the recall list to gather host blocks (worker thread in async mode).
    packed = torch.stack([host_ids, rl.head, rl.count.expand_as(host_ids)]).cpu()
    n = int(packed[2, 0])
    if n == 0:
        return None
    heads = rl.head[:n].to(torch.int32)
    end = cache.recall.recall(layer, packed[0, :n], heads, dst_loc[:n], mode=mode,
                              before_scatter=before_scatter, heads_cpu=packed[1, :n])
    cache.add_recall_stats(n)
    return end


def _apply_walk(
    cache: FreeKVCache,
    layer: int,
    rows: torch.Tensor,
    slot_loc: torch.Tensor,
    page_table: torch.Tensor,
    sel: torch.Tensor,
    scores: torch.Tensor,
    res: torch.Tensor,
    head_mask: torch.Tensor,
    *,
    mode: str,
    before_scatter: Any,
) -> None:
    """:func:`apply_selection` for a few CPU rows (a correction): the diff, the host page
    ids and the destination rows in Python lists, one tensor each for the recall (about a
    third of the ops of the tensor path; same blocks, same order)."""
    out, new_res = diff_walk(sel, scores, res, head_mask)
    cache.residency[layer].index_copy_(0, rows, torch.tensor(new_res, dtype=torch.int32))
    n = len(out[0])
    if n == 0:
        return
    batch, heads, slots, pages = out
    pt = page_table.tolist()  # [b][max_pages] host page ids
    sl = slot_loc.tolist()  # [b][budget_pages] first device row of each slot
    ns = cache.g.sink_pages
    host_ids = torch.tensor([pt[b][p] for b, p in zip(batch, pages)], dtype=torch.int64)
    dst_loc = torch.tensor([sl[b][ns + j] for b, j in zip(batch, slots)], dtype=torch.int64)
    heads_t = torch.tensor(heads, dtype=torch.int64)
    cache.recall.recall(layer, host_ids, heads_t, dst_loc, mode=mode,
                        before_scatter=before_scatter, heads_cpu=heads_t)
    cache.add_recall_stats(n)
