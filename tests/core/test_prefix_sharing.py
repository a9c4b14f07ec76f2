"""Prefix-sharing primitives of the core: page references, commit with shared pages, the
partial-page host copy, token slots, host loads and page replacement."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.pool_host import FreeKVHostPool
from sglang_freekv.reference import ReferenceDecoder

from .conftest import make_cfg

P = 16


def _dec() -> ReferenceDecoder:
    cfg = make_cfg(P, k=3, sink=1, window=2, dense_layers=(0,))
    return ReferenceDecoder(cfg, num_layers=3, num_qo_heads=4, num_kv_heads=2, max_len=320)


def _host_tokens(dec: ReferenceDecoder, layer: int, slots: torch.Tensor) -> torch.Tensor:
    k, _ = dec.cache.load_tokens(layer, slots)
    return k


def test_refcounts_free_at_zero_and_refuse_underflow() -> None:
    pool = FreeKVHostPool(1, 6, 1, 4, 2, torch.float32, pin_memory=False)
    a = pool.alloc(owner=0, n=3)
    pool.incref(torch.tensor([int(a[0]), int(a[0]), int(a[1])]))  # repeats count
    assert pool.refs(a).tolist() == [3, 2, 1]
    assert pool.decref(a) == 1 and pool.used_pages == 2  # a[2] freed
    assert pool.decref(torch.tensor([int(a[0]), int(a[1])])) == 1 and pool.used_pages == 1
    with pytest.raises(ValueError, match="not allocated"):
        pool.incref(a[1:2])
    assert pool.decref(a[:1]) == 1 and pool.used_pages == 0
    with pytest.raises(ValueError, match="more often than held"):
        pool.decref(a[:1])


def test_commit_writes_partial_last_page_and_token_slots() -> None:
    dec = _dec()
    n = 5 * P + 7
    row = dec.add_request(n)
    slots = dec.cache.token_host_slots(row, 0, n)
    assert slots.shape == (n,) and bool((slots >= 0).all())
    truth = dec.req_to_token[row, :n]
    for layer in (1, 2):  # every prompt token, the partial last page included, is on the host
        assert torch.equal(_host_tokens(dec, layer, slots), dec.k_buffers[layer][truth])


def test_commit_with_shared_pages_and_release() -> None:
    dec = _dec()
    cache = dec.cache
    n = 6 * P + 3
    a = dec.add_request(n)
    a_pages = cache.t.host_pages_cpu[a, :7].to(torch.int64)
    # Request b: same first 4 pages (shared), then its own tokens, staged at a's rows.
    b = next(r for r in range(dec.max_reqs) if r not in dec.seq_len)
    loc = dec.req_to_token[a, :n]
    bp = cache.g.budget_pages
    cache.admit(b, dec._dense_rows + (b * bp + torch.arange(bp)) * P)
    used = cache.host.used_pages
    cache.commit_prefill(b, n, loc, shared_pages=a_pages[:4])
    b_pages = cache.t.host_pages_cpu[b, :7].to(torch.int64)
    assert torch.equal(b_pages[:4], a_pages[:4]) and set(b_pages[4:].tolist()).isdisjoint(
        a_pages.tolist())
    assert cache.host.used_pages == used + 3
    assert cache.host.refs(a_pages[:4]).tolist() == [2] * 4
    for layer in (1, 2):
        assert torch.equal(_host_tokens(dec, layer, cache.token_host_slots(b, 0, n)),
                           dec.k_buffers[layer][loc])
    cache.release(a)
    del dec.seq_len[a], dec.decoded[a], dec.base_q[a]
    assert cache.host.refs(a_pages[:4]).tolist() == [1] * 4 and cache.host.used_pages == 7
    cache.release(b)
    assert cache.host.used_pages == 0


def test_release_flushes_partial_page_and_replace_pages() -> None:
    dec = _dec()
    cache = dec.cache
    row = dec.add_request(3 * P + 2)
    for _ in range(3):  # seq_len 3P+2 -> 3P+5: the partial page grows during decode
        dec.step([row])
    n = dec.seq_len[row]
    slots = cache.token_host_slots(row, 3 * P, n)
    pages = cache.t.host_pages_cpu[row, :4].to(torch.int64)
    cache.host.incref(pages)  # keep them, as the radix cache's token ids would
    truth = dec.req_to_token[row, 3 * P:n]
    cache.release(row, kv_len=n)
    for layer in (1, 2):
        assert torch.equal(_host_tokens(dec, layer, slots), dec.k_buffers[layer][truth])
    assert cache.host.used_pages == 4
    cache.host.decref(pages)
    assert cache.host.used_pages == 0


def test_replace_pages_moves_one_reference() -> None:
    dec = _dec()
    cache = dec.cache
    a = dec.add_request(4 * P)
    b = dec.add_request(4 * P)
    pa = cache.t.host_pages_cpu[a, :4].to(torch.int64)
    pb = cache.t.host_pages_cpu[b, :4].to(torch.int64)
    cache.replace_pages(b, torch.tensor([0, 1]), pa[:2])
    assert cache.t.host_pages_cpu[b, :4].tolist() == pa[:2].tolist() + pb[2:].tolist()
    assert torch.equal(cache.t.host_pages[b].cpu(), cache.t.host_pages_cpu[b])
    assert cache.host.used_pages == 6 and cache.host.refs(pa[:2]).tolist() == [2, 2]
    dec.remove_request(a)
    dec.remove_request(b)
    assert cache.host.used_pages == 0
