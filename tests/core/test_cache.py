"""FreeKVCache lifecycle: prefill commit, plan, window exit, accounting, errors, stats."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.pool_host import FreeKVHostPoolFull
from sglang_freekv.reference import ReferenceDecoder

from .conftest import make_cfg

P = 16


def _dec(**kw: object) -> ReferenceDecoder:
    cfg = make_cfg(P, k=3, sink=1, window=2, dense_layers=(0, 7))  # 7 >= num_layers: ignored
    return ReferenceDecoder(cfg, num_layers=3, num_qo_heads=4, num_kv_heads=2, max_len=320,
                            **kw)  # type: ignore[arg-type]


def _slot_rows(dec: ReferenceDecoder, row: int, slot: int) -> torch.Tensor:
    return dec.cache.t.slot_loc_cpu[row, slot] + torch.arange(P)


def test_commit_prefill_layout() -> None:
    dec = _dec()
    cache, g = dec.cache, dec.cache.g
    n = 8 * P + 5  # 9 pages: sink 0, middle 1..6 (M = 6 > k = 3), window 7, 8 (partial)
    row = dec.add_request(n)
    assert cache.sparse_layers == [1, 2]
    ids = cache.t.host_pages_cpu[row]
    assert int((ids >= 0).sum()) == 9 and cache.host.used_by(row) == 9
    for layer in (1, 2):
        kb, vb = dec.k_buffers[layer], dec.v_buffers[layer]
        truth = dec.req_to_token[row]
        for page, slot in [(0, 0), (1, 1), (2, 2), (3, 3), (7, 4 + 7 % 2), (8, 4 + 8 % 2)]:
            count = min(P, n - page * P)
            rows = _slot_rows(dec, row, slot)[:count]
            assert torch.equal(kb[rows], kb[truth[page * P: page * P + count]]), (layer, page)
            assert torch.equal(vb[rows], vb[truth[page * P: page * P + count]]), (layer, page)
        for page in range(8):  # full pages are on the host, with digests
            keys = kb[truth[page * P:(page + 1) * P]]  # [P, H, D]
            host = cache.host.kv[layer, ids[page]]  # [H, 2, P, D]
            assert torch.equal(host[:, 0], keys.permute(1, 0, 2))
            dig = cache.digests[layer, ids[page]]
            assert torch.equal(dig[:, 0], keys.amin(0)) and torch.equal(dig[:, 1], keys.amax(0))
        res = cache.residency[layer, row]
        assert res.tolist() == [[1, 2, 3]] * 2  # first min(M, k) middle pages
    # dense layer 0: its budget slots were never written by the cache
    assert bool((dec.k_buffers[0][_slot_rows(dec, row, 1)] == 0).all())
    dec.remove_request(row)
    assert cache.host.used_pages == 0
    assert bool((cache.t.host_pages_cpu[row] == -1).all())
    assert bool((cache.residency[:, row] == -1).all())


def test_plan_opens_page_and_window_exit() -> None:
    dec = _dec(num_host_pages=40)
    cache = dec.cache
    row = dec.add_request(4 * P)  # 4 full pages: sink 0, middle 1, window 2, 3
    assert cache.residency[1, row].tolist() == [[1, -1, -1]] * 2
    used = cache.host.used_pages
    dec.step([row])  # token 4P opens page 4; page 2 leaves the window -> slot ns + 1
    assert cache.host.used_pages == used + 1
    assert int(cache.t.host_pages_cpu[row, 4]) >= 0
    for layer in (1, 2):
        assert cache.residency[layer, row].tolist() == [[1, 2, -1]] * 2
        truth = dec.req_to_token[row][2 * P: 3 * P]
        assert torch.equal(dec.k_buffers[layer][_slot_rows(dec, row, 2)],
                           dec.k_buffers[layer][truth])
    assert cache.stats()["recalled_pages"] == 0
    dec.remove_request(row)


def test_plan_fields() -> None:
    dec = _dec()
    cache = dec.cache
    a, b = dec.add_request(3 * P - 1), dec.add_request(12 * P)
    rows = torch.tensor([b, a])
    n = torch.tensor([12 * P + 1, 3 * P])
    plan = cache.plan_decode(rows, n, n)
    assert plan.bs == 2 and plan.sparse_cpu.tolist() == [True, False]
    assert plan.num_comp == 1 and plan.num_exit == 0  # a completes page 2
    assert plan.comp_host_ids_cpu.tolist() == [int(cache.t.host_pages_cpu[a, 2])]
    assert plan.kv_lens.tolist() == [5 * P + 1, 3 * P]
    assert plan.token_loc.tolist()[1] == int(_slot_rows(dec, a, 4 + 2 % 2)[P - 1])
    assert plan.cand_start.tolist() == [1, 1] and plan.cand_end.tolist() == [11, 1]
    dec.remove_request(a)
    dec.remove_request(b)


def test_host_full_and_accounting() -> None:
    dec = _dec(num_host_pages=10)
    cache = dec.cache
    a = dec.add_request(6 * P)
    with pytest.raises(FreeKVHostPoolFull, match="needed 5 pages"):
        dec.add_request(5 * P)
    row_b = 1  # the failed request's row: the engine releases it
    cache.release(row_b)
    assert cache.host.used_pages == 6
    b = dec.add_request(4 * P)  # 4 pages: pool now full
    assert cache.host.free_pages == 0
    with pytest.raises(FreeKVHostPoolFull):
        dec.step([a, b])  # a token opening a new page needs a host page
    dec.remove_request(a)
    dec.remove_request(b)
    assert cache.host.used_pages == 0 and cache.stats()["host_pages_used"] == 0


def test_nonspeculative_submits_nothing() -> None:
    cfg = make_cfg(P, k=3, speculative=False, tau=None)
    dec = ReferenceDecoder(cfg, num_layers=2, num_qo_heads=2, num_kv_heads=2, max_len=320)
    submitted: list[object] = []
    dec.cache.recall.submit = submitted.append  # type: ignore[method-assign]
    row = dec.add_request(10 * P)
    for _ in range(5):
        dec.step([row])
    assert submitted == [] and dec.cache.stats()["recalled_pages"] > 0
    dec.remove_request(row)


def test_stats_keys_and_errors() -> None:
    dec = _dec()
    st = dec.cache.stats()
    for key in ("recall_bytes", "recalled_pages", "checked_heads", "corrected_heads",
                "host_pages_used", "corrections_per_layer"):
        assert key in st
    with pytest.raises(ValueError, match="max_pages_per_req"):
        dec.cache.commit_prefill(0, 400, torch.arange(400))
    with pytest.raises(ValueError, match="slot_loc"):
        dec.cache.admit(0, torch.arange(3))
