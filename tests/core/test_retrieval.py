"""Residency diff (vectorized) against a per-(request, head) Python spelling of the rule."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.kernels.select import select_pages
from sglang_freekv.retrieval import residency_diff, select_batch


def _loop_diff(sel, scores, res, mask, res_scores):
    """Rule: keep resident pages; new pages (by descending score) take free slots, empty
    first, then evictable slots by ascending resident score (ties: slot order)."""
    bs, h, k = sel.shape
    new_res = res.clone()
    recalls = []
    for b in range(bs):
        for x in range(h):
            if not mask[b, x]:
                continue
            s = [int(p) for p in sel[b, x] if p >= 0]
            r = res[b, x].tolist()
            new = [(float(scores[b, x, i]), i, int(sel[b, x, i])) for i in range(k)
                   if sel[b, x, i] >= 0 and int(sel[b, x, i]) not in r]
            new.sort(key=lambda t: (-t[0], t[1]))
            empty = [j for j in range(k) if r[j] < 0]
            evict = [j for j in range(k) if r[j] >= 0 and r[j] not in s]
            rs = res_scores[b, x] if res_scores is not None else torch.zeros(k)
            evict.sort(key=lambda j: (float(rs[j]), j))
            free = empty + evict
            for (_, _, page), j in zip(new, free):
                new_res[b, x, j] = page
                recalls.append((b, x, j, page))
    return new_res, recalls


@pytest.mark.parametrize("impl", ["vector", "lists"])
@pytest.mark.parametrize("with_scores", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_residency_diff_matches_rule(seed: int, with_scores: bool, impl: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    bs, h, k, pages = 5, 3, 6, 14
    sel = torch.stack([torch.stack([torch.randperm(pages, generator=gen)[:k]
                                    for _ in range(h)]) for _ in range(bs)]).to(torch.int32)
    scores = torch.rand(bs, h, k, generator=gen)
    if seed % 2:
        scores = (scores * 3).floor()  # ties: new pages keep selection order
    pad = torch.rand(bs, h, k, generator=gen) < 0.15
    sel[pad], scores[pad] = -1, float("-inf")
    res = torch.stack([torch.stack([torch.randperm(pages, generator=gen)[:k]
                                    for _ in range(h)]) for _ in range(bs)]).to(torch.int32)
    res[torch.rand(bs, h, k, generator=gen) < 0.2] = -1
    mask = torch.rand(bs, h, generator=gen) < 0.7
    res_scores = torch.rand(bs, h, k, generator=gen) if with_scores else None
    if with_scores and seed % 2:
        res_scores = (res_scores * 2).floor()  # ties: evictable slots keep slot order
    rl, new_res = residency_diff(sel, scores, res, mask, res_scores, impl=impl)
    want_res, want = _loop_diff(sel, scores, res, mask, res_scores)
    assert new_res.dtype == torch.int32
    assert torch.equal(new_res, want_res)
    n = int(rl.count)
    got = list(zip(rl.batch[:n].tolist(), rl.head[:n].tolist(), rl.slot[:n].tolist(),
                   rl.page[:n].tolist()))
    assert sorted(got) == sorted(want)
    if impl == "vector":
        assert rl.batch.numel() == bs * h * k  # padded, no host sync needed
    else:
        assert rl.batch.numel() == n
    other, other_res = residency_diff(sel, scores, res, mask, res_scores,
                                      impl="lists" if impl == "vector" else "vector")
    assert torch.equal(other_res, new_res)  # both paths: same slots, same recall order
    m = int(other.count)
    assert [t[:n].tolist() for t in (rl.batch, rl.head, rl.slot, rl.page)] == \
        [t[:m].tolist() for t in (other.batch, other.head, other.slot, other.page)]
    # every selected page of a masked head is resident afterwards
    for b in range(bs):
        for x in range(h):
            if mask[b, x]:
                assert {int(p) for p in sel[b, x] if p >= 0} <= set(new_res[b, x].tolist())
            else:
                assert torch.equal(new_res[b, x], res[b, x])


def test_residency_diff_routing_and_bad_impl() -> None:
    sel = torch.tensor([[[3, 1]]], dtype=torch.int32)
    scores = torch.tensor([[[0.6, 0.4]]])
    res = torch.tensor([[[-1, 1]]], dtype=torch.int32)
    mask = torch.ones(1, 1, dtype=torch.bool)
    rl, new_res = residency_diff(sel, scores, res, mask)  # CPU, 1 row: list walk, unpadded
    assert rl.batch.numel() == 1 and new_res.tolist() == [[[3, 1]]]
    assert rl.slot.tolist() == [0] and rl.page.tolist() == [3]
    with pytest.raises(ValueError, match="impl"):
        residency_diff(sel, scores, res, mask, impl="fast")


def test_select_batch_ragged_inactive_rows() -> None:
    bs, hq, h, d, pages = 3, 4, 2, 8, 12
    q = torch.randn(bs, hq, d)
    digests = torch.randn(40, h, 2, d)
    digests = torch.stack([digests.amin(2), digests.amax(2)], dim=2)
    table = torch.randperm(40)[: bs * pages].view(bs, pages).to(torch.int32)
    start = torch.tensor([1, 1, 1], dtype=torch.int32)
    end = torch.tensor([10, 3, 9], dtype=torch.int32)
    active = torch.tensor([True, True, False])
    sel, sc = select_batch(q, digests, table, start, end, active, h, 3)
    assert sel.shape == (bs, h, 3)
    assert bool((sel[2] == -1).all()) and bool(torch.isinf(sc[2]).all())
    assert bool((sel[1, :, 2] == -1).all())  # only 2 candidates
    ref, _ = select_pages(q[:1], digests, table[:1], start[:1], end[:1], h, 3)
    assert torch.equal(sel[:1], ref)
    assert bool(((sel[0] >= 1) & (sel[0] < 10)).all())
