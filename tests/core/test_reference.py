"""End-to-end decode over the reference driver: exactness, selection rule, slot content."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.reference import ReferenceDecoder

from .conftest import HAS_CUDA, RuleChecker, make_cfg

GQA = [pytest.param(2, 2, id="gs1"), pytest.param(8, 2, id="gs4")]


def _run_schedule(dec: ReferenceDecoder, lens: list[int], steps: int, checker=None,
                  on_step=None) -> None:
    """Ragged batch; one request joins at step 3, one sits out step 5, one leaves at step 8,
    one joins at step 12 (reusing the freed row)."""
    rows = [dec.add_request(n) for n in lens]
    for s in range(steps):
        if s == 3:
            rows.append(dec.add_request(lens[0] + 7))
        if s == 8:
            gone = rows.pop(1)
            dec.remove_request(gone)
            if checker is not None:
                checker.forget(gone)
        if s == 12:
            rows.append(dec.add_request(lens[-1] + 3))
        batch = rows[1:] if s == 5 else rows  # a request sits out one step
        out = dec.step(batch, on_layer=checker)
        if on_step is not None:
            on_step(out)
    for r in rows:
        dec.remove_request(r)
    assert dec.cache.host.used_pages == 0


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("hq,h", GQA)
@pytest.mark.parametrize("speculative", [True, False])
def test_budget_covers_context_is_exact(page_size: int, hq: int, h: int,
                                        speculative: bool) -> None:
    # k = 12 retrieved pages: contexts below (1 + 12 + 2) pages stay in the dense regime.
    cfg = make_cfg(page_size, k=12, speculative=speculative)
    dec = ReferenceDecoder(cfg, num_layers=3, num_qo_heads=hq, num_kv_heads=h,
                           max_len=16 * page_size)
    lens = [page_size * 3 + 5, page_size - 1, page_size * 9]
    checker = RuleChecker(dec)

    def exact(out) -> None:
        for layer, (o, d) in enumerate(zip(out.outputs, out.dense)):
            assert torch.equal(o, d), f"layer {layer} differs from dense attention"

    _run_schedule(dec, lens, steps=2 * page_size + 3, checker=checker, on_step=exact)
    assert checker.sparse_checks == 0 and checker.slot_checks > 0
    assert dec.cache.stats()["recalled_pages"] == 0


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("hq,h", GQA)
@pytest.mark.parametrize("mode", ["spec_tau", "spec", "nonspec"])
def test_selection_rule_and_slot_content(page_size: int, hq: int, h: int, mode: str) -> None:
    cfg = make_cfg(page_size, k=3, tau=0.8 if mode == "spec_tau" else None,
                   speculative=mode != "nonspec")
    dec = ReferenceDecoder(cfg, num_layers=3, num_qo_heads=hq, num_kv_heads=h,
                           max_len=20 * page_size, recall_group_blocks=4, seed=page_size + hq)
    # 30 ~ dense throughout, 5P+3 crosses dense -> sparse, 11P sparse from the start.
    lens = [30, page_size * 5 + 3, page_size * 11]
    checker = RuleChecker(dec)
    _run_schedule(dec, lens, steps=page_size + 6, checker=checker)
    st = dec.cache.stats()
    assert checker.sparse_checks > 20 and checker.slot_checks > 0
    assert st["recalled_pages"] > 0 and st["recall_bytes"] > 0
    if mode == "spec_tau":
        assert 0 < st["corrected_heads"] < st["checked_heads"]
        assert checker.corrected == st["corrected_heads"]
        assert sum(st["corrections_per_layer"]) == st["corrected_heads"]
        assert st["corrections_per_layer"][0] == 0  # dense layer
    else:
        assert st["corrected_heads"] == 0
    dec.cache.close()


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["spec_tau", "nonspec"])
def test_cuda_decode(mode: str) -> None:
    cfg = make_cfg(16, k=3, tau=0.8 if mode == "spec_tau" else None,
                   speculative=mode != "nonspec")
    dec = ReferenceDecoder(cfg, num_layers=3, num_qo_heads=8, num_kv_heads=2,
                           max_len=320, device="cuda", recall_group_blocks=4)
    checker = RuleChecker(dec)
    _run_schedule(dec, [30, 83, 176], steps=22, checker=checker)
    assert checker.sparse_checks > 20
    dec.cache.close()


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_budget_covers_context_is_exact() -> None:
    cfg = make_cfg(32, k=12)
    dec = ReferenceDecoder(cfg, num_layers=3, num_qo_heads=8, num_kv_heads=2,
                           max_len=16 * 32, device="cuda")

    def exact(out) -> None:
        for o, d in zip(out.outputs, out.dense):
            assert torch.equal(o, d)

    _run_schedule(dec, [101, 31, 288], steps=40, on_step=exact)
    dec.cache.close()


@pytest.mark.parametrize("q_noise", [(0.2, 0.5), (0.5,)])
def test_candidate_growth_with_correction(q_noise: tuple[float, ...]) -> None:
    """Staggered lengths: every few steps some request opens a page, so its candidate range
    grows while corrections are frequent; sel_t must not be reused across a range change."""
    cfg = make_cfg(16, k=3, tau=0.8)
    dec = ReferenceDecoder(cfg, num_layers=2, num_qo_heads=4, num_kv_heads=2, max_len=400,
                           seed=1, q_noise=q_noise)
    rows = [dec.add_request(16 * 7 + 3 * i) for i in range(5)]
    checker = RuleChecker(dec)
    for _ in range(56):  # > nw pages: pages completed in decode become candidates
        dec.step(rows, on_layer=checker)
    st = dec.cache.stats()
    assert 0 < st["corrected_heads"] < st["checked_heads"]
    for r in rows:
        dec.remove_request(r)


@pytest.mark.parametrize("page_size", [16, 32])
def test_prompts_shorter_than_the_sink(page_size: int) -> None:
    """Prompts of fewer pages than the sink (no window pages yet) grow through every regime
    and stay exact while the budget covers them."""
    cfg = make_cfg(page_size, k=2, sink=3, window=2)
    dec = ReferenceDecoder(cfg, num_layers=2, num_qo_heads=4, num_kv_heads=2,
                           max_len=12 * page_size)
    rows = [dec.add_request(n) for n in (3, page_size + 1, 2 * page_size)]
    for _ in range(2 * page_size):
        out = dec.step(rows)
        for o, d in zip(out.outputs, out.dense):
            assert torch.equal(o, d)
    for r in rows:
        dec.remove_request(r)
    assert dec.cache.host.used_pages == 0
