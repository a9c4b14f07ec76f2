"""Recall engine: host HND blocks land in exactly one head column of the destination slot."""

from __future__ import annotations

import threading

import pytest
import torch

from sglang_freekv.pool_host import FreeKVHostPool
from sglang_freekv.recall import FreeKVRecallEngine

from .conftest import HAS_CUDA

L, PAGES, H, P, D = 2, 12, 3, 4, 8


def _setup(device: str, num_staging: int = 2, group_blocks: int = 3):
    pool = FreeKVHostPool(L, PAGES, H, P, D, torch.float32, pin_memory=device == "cuda")
    pool.kv.copy_(torch.randn(pool.kv.shape))
    rows = 10 * P
    kb = [torch.zeros(rows, H, D, device=device) for _ in range(L)]
    vb = [torch.zeros(rows, H, D, device=device) for _ in range(L)]
    eng = FreeKVRecallEngine(pool, kb, vb, device=device, group_blocks=group_blocks,
                             num_staging=num_staging)
    return pool, kb, vb, eng


def _blocks(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(10 * H, generator=gen)[:n]  # distinct (slot, head)
    slot, head = pairs // H, pairs % H
    host_ids = torch.randint(PAGES, (n,), generator=gen)
    return host_ids, head, slot * P


def _check(pool, kb, vb, layer, host_ids, head, dst) -> None:
    written = torch.zeros(kb[layer].shape[:2], dtype=torch.bool)
    for i in range(host_ids.numel()):
        rows = slice(int(dst[i]), int(dst[i]) + P)
        blk = pool.kv[layer, host_ids[i], head[i]]  # [2, P, D]
        assert torch.equal(kb[layer][rows, head[i]].cpu(), blk[0])
        assert torch.equal(vb[layer][rows, head[i]].cpu(), blk[1])
        written[rows, head[i]] = True
    assert bool((kb[layer].cpu()[~written] == 0).all()), "another head column was written"


DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_staging", [1, 2])
def test_sync_recall(device: str, num_staging: int) -> None:
    pool, kb, vb, eng = _setup(device, num_staging)
    host_ids, head, dst = _blocks(11, 0)  # 4 groups of <= 3 blocks
    ev = eng.recall(1, host_ids, head.to(device, torch.int32), dst.to(device), mode="sync")
    if device == "cuda":
        torch.cuda.current_stream().wait_event(ev)
        torch.cuda.synchronize()
    else:
        assert ev is None
    _check(pool, kb, vb, 1, host_ids, head, dst)
    assert bool((kb[0].cpu() == 0).all())  # other layer untouched
    eng.close()


@pytest.mark.parametrize("device", DEVICES)
def test_async_jobs_run_in_order(device: str) -> None:
    pool, kb, vb, eng = _setup(device)
    order: list[int] = []
    points: list[str] = []
    eng._checkpoint = points.append  # type: ignore[method-assign]
    futs = []
    for layer in (0, 1, 0):
        host_ids, head, dst = _blocks(5, layer)

        def job(layer=layer, host_ids=host_ids, head=head, dst=dst):
            order.append(layer)
            assert threading.current_thread().name.startswith("freekv-recall")
            return eng.recall(layer, host_ids, head.to(device, torch.int32), dst.to(device),
                              mode="async")

        futs.append(eng.submit(job))
    eng.wait_all()
    results = [f.result() for f in futs]
    assert order == [0, 1, 0]
    assert "job_start" in points and "gathered" in points
    if device == "cuda":
        for ev in results:
            torch.cuda.current_stream().wait_event(ev)
        torch.cuda.synchronize()
    else:
        assert results == [None, None, None]
    host_ids, head, dst = _blocks(5, 1)
    _check(pool, kb, vb, 1, host_ids, head, dst)
    eng.close()


class _Fence:
    """A ``before_scatter`` fence that says when the job reached it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def wait(self) -> None:
        self.reached.set()
        assert self.opened.wait(timeout=60), "fence never opened"


def test_before_scatter_fence_is_waited() -> None:
    """The job has gathered its blocks and waits the fence: nothing is scattered until it
    opens (a scatter before the wait, or no wait at all, fails here)."""
    pool, kb, vb, eng = _setup("cpu")
    host_ids, head, dst = _blocks(4, 3)
    fence = _Fence()
    fut = eng.submit(lambda: eng.recall(0, host_ids, head.to(torch.int32), dst, mode="async",
                                        before_scatter=fence))
    assert fence.reached.wait(timeout=60), "the job never waited the fence"
    assert not fut.done()
    assert bool((kb[0] == 0).all()) and bool((vb[0] == 0).all())  # nothing scattered yet
    fence.opened.set()
    fut.result(timeout=60)
    _check(pool, kb, vb, 0, host_ids, head, dst)
    eng.close()


def test_rejects_bad_staging_count() -> None:
    pool = FreeKVHostPool(1, 2, 1, 2, 2, torch.float32, pin_memory=False)
    with pytest.raises(ValueError, match="num_staging"):
        FreeKVRecallEngine(pool, [], [], device="cpu", num_staging=3)
