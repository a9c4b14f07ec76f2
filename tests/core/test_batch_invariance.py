"""A request's FreeKV decode does not depend on what else is in its batch.

FreeKV's state is per request (budget chunk, page table, ``last_q``, residency, jobs) and its
selection, correction and attention are per request, so with the same inputs a request must
get bit-identical selections and outputs alone and next to longer, shorter, joining and
leaving requests: the same selections (residency) and the same query, K and V fed to
attention, step after step. (The engine's own numerics may still vary with the batch, and
so do this decoder's padded reference attention outputs: see docs/design.md "Batch
invariance".) The page scores themselves, bit for bit, are checked in
tests/kernels/test_select.py (``test_cpu_path_is_batch_invariant``).
"""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.reference import ReferenceDecoder

from .conftest import make_cfg

P = 16
X_LEN, X_SEED = P * 11 + 5, 7


def _decoder(speculative: bool, job: str) -> ReferenceDecoder:
    cfg = make_cfg(P, k=3, tau=0.8, speculative=speculative,
                   speculative_job=job if speculative else "auto")
    return ReferenceDecoder(cfg, num_layers=3, num_qo_heads=6, num_kv_heads=2,
                            max_len=24 * P, seed=1, q_noise=(0.2, 0.5, 1.0),
                            per_request_inputs=True)


class _Feed:
    """on_layer callback: what FreeKV feeds attention for one request at each sparse layer
    (the K and V rows of its budget view, in order) and the request's query."""

    def __init__(self, dec: ReferenceDecoder) -> None:
        self.dec, self.pos = dec, 0
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer, plan, q, o, dense) -> None:  # type: ignore[no-untyped-def]
        if layer in self.dec.cfg.dense_layers:
            return
        lo, hi = int(plan.kv_indptr[self.pos]), int(plan.kv_indptr[self.pos + 1])
        rows = plan.kv_indices[lo:hi]
        self.seen.append((q[self.pos].clone(), self.dec.k_buffers[layer][rows].clone(),
                          self.dec.v_buffers[layer][rows].clone()))


@pytest.mark.parametrize("speculative,job", [(True, "step"), (True, "layer"), (False, "auto")],
                         ids=["spec-step", "spec-layer", "sync"])
def test_a_request_decodes_the_same_alone_and_in_a_batch(speculative: bool, job: str) -> None:
    alone, batch = _decoder(speculative, job), _decoder(speculative, job)
    xa = alone.add_request(X_LEN, seed=X_SEED)
    others = [batch.add_request(30, seed=1)]  # dense throughout
    xb = batch.add_request(X_LEN, seed=X_SEED)
    others.append(batch.add_request(P * 20 + 3, seed=2))  # a wider page window than x's
    feed_a, feed_b = _Feed(alone), _Feed(batch)
    for s in range(P + 6):
        if s == 5:
            others.append(batch.add_request(P * 9 + 1, seed=3))
        if s == 9:
            batch.remove_request(others.pop(0))
        rows = sorted([xb, *others])
        feed_b.pos = rows.index(xb)
        alone.step([xa], on_layer=feed_a)
        batch.step(rows, on_layer=feed_b)
        for d in (alone, batch):
            d.cache.recall.wait_all()
        assert torch.equal(alone.cache.residency[:, xa], batch.cache.residency[:, xb]), s
    assert len(feed_a.seen) == len(feed_b.seen) > 0
    for i, (a, b) in enumerate(zip(feed_a.seen, feed_b.seen)):
        for name, ta, tb in zip(("q", "K", "V"), a, b):
            assert torch.equal(ta, tb), f"sparse layer-step {i}: {name} fed to attention differs"
    stats = alone.cache.stats()
    assert stats["recalled_pages"] > 0
    if speculative:
        assert stats["corrected_heads"] > 0
    for d in (alone, batch):
        d.cache.close()
