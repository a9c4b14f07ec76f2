"""Recall engine: host HND blocks land in exactly one head column of the destination slot."""

from __future__ import annotations

import threading

import pytest
import torch

from sglang_freekv.pool_host import FreeKVHostPool
from sglang_freekv.recall import FreeKVRecallEngine, _SharedRows

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


@pytest.mark.parametrize("shared", [True, False], ids=["one-storage", "per-layer"])
def test_recall_layers_puts_each_block_in_its_layer(shared: bool) -> None:
    """recall_layers (the CPU step job's copy): blocks of several layers in one call land
    as per-layer recalls put them, with one scatter when the buffers share a storage and one
    recall per layer when they do not."""
    pool = FreeKVHostPool(L, PAGES, H, P, D, torch.bfloat16, pin_memory=False)
    pool.kv.copy_(torch.randn(pool.kv.shape))
    rows = 10 * P
    if shared:
        kv = torch.zeros((L, 2, rows, H, D), dtype=torch.bfloat16)
        kb, vb = list(kv[:, 0].unbind(0)), list(kv[:, 1].unbind(0))
    else:
        kb = [torch.zeros(rows, H, D, dtype=torch.bfloat16) for _ in range(L)]
        vb = [torch.zeros(rows, H, D, dtype=torch.bfloat16) for _ in range(L)]
    eng = FreeKVRecallEngine(pool, kb, vb, device="cpu")
    assert (eng._shared is not None) == shared
    blocks = [_blocks(5, 10), _blocks(7, 11)]  # layer 0, layer 1 (grouped by layer)
    layers = torch.cat([torch.full((5,), 0), torch.full((7,), 1)])
    host_ids, head, dst = (torch.cat([b[i] for b in blocks]) for i in range(3))
    fence = _Fence()
    fence.opened.set()
    eng.recall_layers(layers, host_ids, head, dst, before_scatter=fence)
    assert fence.reached.is_set()
    for layer, (h_ids, hd, ds) in enumerate(blocks):
        _check(pool, kb, vb, layer, h_ids, hd, ds)
    eng.close()


def test_shared_rows_needs_one_storage_of_same_layout() -> None:
    kv = torch.zeros((3, 2, 8, H, D))
    shared = _SharedRows.of(list(kv[:, 0].unbind(0)), list(kv[:, 1].unbind(0)))
    assert shared is not None
    assert shared.base.tolist() == [[0, 8 * H], [16 * H, 24 * H], [32 * H, 40 * H]]
    alone = [torch.zeros(8, H, D) for _ in range(3)]
    assert _SharedRows.of(alone, [torch.zeros(8, H, D) for _ in range(3)]) is None
    # a layer whose buffer is not [rows, H, D] contiguous: no shared view
    assert _SharedRows.of([kv[0, 0], kv[1, 0][:, :1]], [kv[0, 1], kv[1, 1][:, :1]]) is None
