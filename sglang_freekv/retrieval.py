"""Page selection over a ragged batch and the vectorized residency diff (design.md "Selection").

Selection itself is the ``select_pages`` kernel (Quest bound, fp32 softmax over candidates per
query head, group mean, top-k). This module feeds it the ragged candidate ranges and turns a
selection into (a) the list of (request, head, slot, page) blocks to recall and (b) the new
residency: with batched torch ops and no host sync on GPUs (no loop over pages or heads), and,
for small CPU batches, with Python lists (a handful of (request, head) rows cost less as a
list walk than as ~40 tensor ops of ~3 us each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RecallList", "diff_walk", "residency_diff", "select_batch"]


def select_batch(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    active: torch.Tensor | None,
    num_kv_heads: int,
    top_k: int,
    scale: float = 1.0,
    span_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k pages per (request, KV head) for a ragged batch.

    Parameters
    ----------
    q : ``[bs, Hq, D]`` model dtype, post-RoPE queries.
    digests : ``[num_host_pages, H, 2, D]`` model dtype (one layer; 0 = min, 1 = max).
    page_table : ``[bs, max_pages]`` int32, host page id of each logical page (-1 none).
    cand_start, cand_end : ``[bs]`` int32, candidate pages ``[start, end)``.
    active : ``[bs]`` bool or None; inactive rows get an empty range (all -1 output).
    scale : softmax temperature of the page scores (``FreeKVConfig.score_scale_for``).
    span_weight : span continuation in [0, 1] (``FreeKVConfig.span_weight``; 0 = off): a
        candidate page scores at least ``span_weight`` times its predecessor, so the page a
        head will read next when it copies a span across a page boundary stays selected.

    Returns ``(page_indices [bs, H, k] int32 (-1 pad), page_scores [bs, H, k] fp32)``.
    """
    from sglang_freekv.kernels.select import select_pages

    if active is not None:
        cand_end = torch.where(active, cand_end, cand_start)  # [bs] int32
    return select_pages(
        q, digests, page_table, cand_start, cand_end, num_kv_heads, top_k, scale=scale,
        span_weight=span_weight,
    )


@dataclass(frozen=True, slots=True)
class RecallList:
    """Blocks to recall, padded to ``bs * H * k`` entries; the first ``count`` are valid.

    Fields (same device as the selection):
    ``batch [N] int64`` batch index, ``head [N] int64`` KV head, ``slot [N] int64`` retrieved slot
    ``j`` in ``[0, k)``, ``page [N] int64`` logical page, ``count [1] int64``.
    (The list-walk path returns exactly ``count`` entries.)
    """

    batch: torch.Tensor
    head: torch.Tensor
    slot: torch.Tensor
    page: torch.Tensor
    count: torch.Tensor


# CPU batches with at most this many (request, head) rows walk lists. Measured at top-k 20
# with ~6 new pages per row (one thread): 6 rows 64 us (lists) vs 100 us (vector), 12 rows
# 110 vs 108, 24 rows 203 vs 140, 87 rows (a step job: 29 layers x 3 heads) 714 vs 229.
LIST_WALK_MAX_ROWS = 12


def residency_diff(
    sel: torch.Tensor,
    sel_scores: torch.Tensor,
    residency: torch.Tensor,
    head_mask: torch.Tensor,
    resident_scores: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[RecallList, torch.Tensor]:
    """New residency and recall list for a selection.

    Pages already resident stay in their slot. Each newly selected page goes into a *free*
    slot: empty slots first, then the slots of resident pages no longer selected, the
    lowest-scoring first (by ``resident_scores`` when given, else slot order). New pages are
    placed in descending ``sel_scores`` order. Heads with ``head_mask`` False are unchanged.

    In the sparse regime ``sel`` holds exactly ``k`` pages, so every free slot is reused and
    the eviction order does not change the resident *set*, only which slot a page lands in.

    Parameters
    ----------
    sel : ``[bs, H, k]`` int32/int64 logical pages, -1 padding (any device).
    sel_scores : ``[bs, H, k]`` fp32 (-inf at padding).
    residency : ``[bs, H, k]`` int32, logical page per retrieved slot (-1 empty).
    head_mask : ``[bs, H]`` bool, heads to update.
    resident_scores : ``[bs, H, k]`` fp32 or None, new scores of the resident pages.
    impl : ``"vector"`` (batched ops, any device, no host sync), ``"lists"`` (CPU list walk)
        or None: ``"lists"`` for CPU batches of at most ``LIST_WALK_MAX_ROWS`` rows.

    Returns ``(RecallList, new_residency [bs, H, k] int32)``.
    """
    bs, h, k = sel.shape
    if impl is None:
        small = sel.device.type == "cpu" and bs * h <= LIST_WALK_MAX_ROWS
        impl = "lists" if small else "vector"
    if impl == "lists":
        return _diff_lists(sel, sel_scores, residency, head_mask, resident_scores)
    if impl != "vector":
        raise ValueError(f"Invalid value of impl: {impl!r} (expected 'vector', 'lists' or None)")
    sel64 = sel.to(torch.int64)
    res64 = residency.to(torch.int64)
    sel_ok = sel64 >= 0
    res_ok = res64 >= 0
    eq = sel64[..., :, None] == res64[..., None, :]  # [bs, H, k(sel), k(slot)]
    eq &= sel_ok[..., :, None] & res_ok[..., None, :]
    is_new = sel_ok & ~eq.any(-1) & head_mask[..., None]  # [bs, H, k] per sel entry
    kept = eq.any(-2)  # [bs, H, k] per slot: resident and still selected
    # Free-slot order: empty slots (key -inf), then evictable by score, kept slots last.
    if resident_scores is None:
        key = torch.zeros((bs, h, k), dtype=torch.float32, device=sel.device)
    else:
        key = resident_scores.to(torch.float32)
    key = torch.where(res_ok, key, torch.full_like(key, float("-inf")))
    key = torch.where(kept, torch.full_like(key, float("inf")), key)
    free_order = torch.sort(key, dim=-1, stable=True).indices  # [bs, H, k] slot ids
    # Rank new pages by descending score, then assign rank r -> free_order[r].
    new_key = torch.where(is_new, sel_scores.to(torch.float32), torch.full_like(key, float("-inf")))
    order = torch.sort(new_key, dim=-1, descending=True, stable=True).indices  # [bs, H, k]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(k, device=sel.device).expand(bs, h, k))
    target = torch.gather(free_order, -1, rank)  # [bs, H, k] slot for each sel entry
    new_res = res64.clone()
    dest = torch.where(is_new, target, torch.full_like(target, k))  # k = dummy column
    padded = torch.cat([new_res, torch.zeros_like(new_res[..., :1])], dim=-1)  # [bs, H, k+1]
    padded.scatter_(-1, dest, torch.where(is_new, sel64, torch.zeros_like(sel64)))
    new_res = padded[..., :k]
    # Recall list: stable compaction of the is_new entries to the front (no host sync).
    flat_new = is_new.reshape(-1)  # [bs*H*k]
    perm = torch.sort((~flat_new).to(torch.int8), stable=True).indices  # new ones first
    idx = torch.arange(bs * h * k, device=sel.device)[perm]
    b_idx = idx // (h * k)
    h_idx = (idx // k) % h
    recall = RecallList(
        batch=b_idx,
        head=h_idx,
        slot=target.reshape(-1)[idx],
        page=sel64.reshape(-1)[idx],
        count=flat_new.sum().reshape(1),
    )
    return recall, new_res.to(torch.int32)


def _diff_lists(
    sel: torch.Tensor,
    sel_scores: torch.Tensor,
    residency: torch.Tensor,
    head_mask: torch.Tensor,
    resident_scores: torch.Tensor | None,
) -> tuple[RecallList, torch.Tensor]:
    """:func:`residency_diff`'s rule as a walk over (request, head) rows (same results; the
    recall list in the same (request, head, selection position) order, unpadded)."""
    bs, h, k = sel.shape
    out, ress = diff_walk(sel, sel_scores, residency, head_mask, resident_scores)
    dev = sel.device
    cols = [torch.tensor(c, dtype=torch.int64, device=dev) for c in out]
    recall = RecallList(batch=cols[0], head=cols[1], slot=cols[2], page=cols[3],
                        count=torch.tensor([len(out[0])], dtype=torch.int64, device=dev))
    return recall, torch.tensor(ress, dtype=torch.int32, device=dev).view(bs, h, k)


def diff_walk(
    sel: torch.Tensor,
    sel_scores: torch.Tensor,
    residency: torch.Tensor,
    head_mask: torch.Tensor,
    resident_scores: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The list walk of :func:`residency_diff` (arguments as there), results as Python
    lists: ``([batch, head, slot, page] columns of the recall list, new residency
    [bs][H][k])``; for CPU callers that go on in Python (a correction's few blocks)."""
    bs, h, _ = sel.shape
    sels, scs, ress = sel.tolist(), sel_scores.tolist(), residency.tolist()
    masks = head_mask.tolist()
    rss = resident_scores.tolist() if resident_scores is not None else None
    out: list[list[int]] = [[], [], [], []]  # batch, head, slot, page
    for b in range(bs):
        for x in range(h):
            if not masks[b][x]:
                continue
            s, res = sels[b][x], ress[b][x]
            rset = {p for p in res if p >= 0}
            new = [i for i, p in enumerate(s) if p >= 0 and p not in rset]
            if not new:
                continue
            sset = {p for p in s if p >= 0}
            evict = [j for j, p in enumerate(res) if p >= 0 and p not in sset]
            if rss is not None:
                row_scores = rss[b][x]
                evict.sort(key=lambda j: row_scores[j])  # stable: ties in slot order
            free = [j for j, p in enumerate(res) if p < 0] + evict
            sc = scs[b][x]
            by_score = sorted(new, key=lambda i: -sc[i])  # stable: ties in selection order
            slot_of = {i: free[r] for r, i in enumerate(by_score)}
            for i in new:  # selection order, like the vectorized compaction
                res[slot_of[i]] = s[i]
                for col, v in zip(out, (b, x, slot_of[i], s[i])):
                    col.append(v)
    return out, ress
