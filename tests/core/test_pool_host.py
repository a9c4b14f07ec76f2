"""Host tier: exact allocator accounting, the full error, sizing, HND block writes."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.pool_host import (
    FreeKVHostPool,
    FreeKVHostPoolFull,
    host_page_bytes,
    pages_for_budget,
)

from .conftest import HAS_CUDA


def _pool(num_pages: int = 10) -> FreeKVHostPool:
    return FreeKVHostPool(2, num_pages, 2, 4, 8, torch.float16, pin_memory=False)


def test_alloc_free_accounting() -> None:
    pool = _pool()
    a = pool.alloc(owner=1, n=4)
    b = pool.alloc(owner=2, n=3)
    assert a.dtype == torch.int64 and a.tolist() == [0, 1, 2, 3]
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert (pool.used_pages, pool.free_pages) == (7, 3)
    assert pool.used_by(1) == 4 and pool.used_by(2) == 3 and pool.used_by(3) == 0
    c = pool.alloc_each(torch.tensor([1, 2, 1]))
    assert pool.used_by(1) == 6 and pool.used_by(2) == 4 and pool.free_pages == 0
    assert len(set(a.tolist() + b.tolist() + c.tolist())) == 10
    assert pool.free_owner(1) == 6
    assert (pool.used_pages, pool.free_pages) == (4, 6)
    d = pool.alloc(owner=5, n=6)
    assert set(d.tolist()).isdisjoint(b.tolist() + [int(c[1])])
    pool.free_owner(2)
    pool.free_owner(5)
    assert pool.used_pages == 0 and pool.free_pages == 10
    assert sorted(pool.alloc(7, 10).tolist()) == list(range(10))


def test_full_raises_one_line() -> None:
    pool = _pool(4)
    pool.alloc(0, 3)
    with pytest.raises(FreeKVHostPoolFull) as exc:
        pool.alloc(1, 2)
    msg = str(exc.value)
    assert isinstance(exc.value, RuntimeError) and "\n" not in msg
    assert "needed 2 pages" in msg and "free 1 of 4 pages" in msg and "GiB" in msg
    assert pool.used_pages == 3  # failed alloc changes nothing
    with pytest.raises(FreeKVHostPoolFull):
        pool.alloc_each(torch.tensor([1, 1]))


def test_sizing() -> None:
    per = host_page_bytes(32, 8, 32, 128, torch.bfloat16)
    assert per == 32 * 8 * 2 * 32 * 128 * 2
    assert pages_for_budget(1.0, num_layers=32, num_kv_heads=8, page_size=32, head_dim=128,
                            dtype=torch.bfloat16) == (1 << 30) // per
    assert pages_for_budget(1e-9, num_layers=1, num_kv_heads=1, page_size=1, head_dim=1,
                            dtype=torch.float32) == 1


def test_write_blocks_cpu() -> None:
    pool = _pool()
    blocks = torch.randn(3, 2, 2, 4, 8).half()
    ids = torch.tensor([7, 2, 5])
    pool.write_blocks(1, ids, blocks)
    assert torch.equal(pool.kv[1, ids], blocks)
    pool.wait_writes()  # no-op on CPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_write_blocks_cuda_pinned() -> None:
    pool = FreeKVHostPool(2, 10, 2, 4, 8, torch.float16, pin_memory=True)
    assert pool.kv.is_pinned()
    blocks = torch.randn(4, 2, 2, 4, 8, device="cuda").half()
    ids = torch.tensor([3, 4, 5, 9])  # two runs
    pool.write_blocks(0, ids, blocks)
    pool.wait_writes()
    assert torch.equal(pool.kv[0, ids], blocks.cpu())


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_pinned_tier_is_not_rounded_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's caching host allocator would pin 2x for a size just above a power of two;
    the tier registers exactly its bytes (in chunks), and writes across chunks land."""
    from sglang_freekv import pool_host

    monkeypatch.setattr(pool_host, "REGISTER_CHUNK_BYTES", 1 << 20)  # several chunks
    stats0 = torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0)
    # 2 layers x 1025 pages x 2 heads x (2 x 16 x 64) fp16 = 16.8 MB: just above 2^24
    pool = FreeKVHostPool(2, 1025, 2, 16, 64, torch.float16, pin_memory=True)
    assert pool.kv.is_pinned()
    assert pool.pinned_bytes == pool.total_bytes  # within 1% of the configured size: exact
    assert len(pool._ranges) > 2
    assert torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0) == stats0
    ids = torch.arange(0, 1025)  # one run of ids that crosses chunk boundaries
    blocks = torch.randn(1025, 2, 2, 16, 64, device="cuda").half()
    pool.write_blocks(1, ids, blocks)
    pool.wait_writes()
    assert torch.equal(pool.kv[1], blocks.cpu())
    per_chunk = pool._pages_per_chunk
    assert 0 < per_chunk < 1025


def test_unpinned_tier_reports_no_pinned_bytes() -> None:
    pool = _pool()
    assert pool.pinned_bytes == 0 and pool.total_bytes == pool.kv.numel() * 2
