"""recall_scatter / backup_gather: Triton kernels vs references; pure data movement, so
every comparison is exact."""

from __future__ import annotations

import pytest
import torch

import sglang_freekv.kernels.scatter as scatter_mod
from sglang_freekv.kernels import (
    backup_gather,
    recall_scatter,
    ref_backup_gather,
    ref_recall_scatter,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _make_recall(
    n: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, loc_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, ...]:
    """Staging blocks for n (slot, head) pairs; slots repeat across different heads, as when
    one retrieved slot holds a different page per KV head."""
    num_slots = n // 2 + 3  # >= n when num_kv_heads == 1
    num_rows = (num_slots + 1) * page_size
    k = torch.randn(num_rows, num_kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn(num_rows, num_kv_heads, head_dim, device=device).to(dtype)
    staging = torch.randn(n, 2, page_size, head_dim, device=device).to(dtype)
    pairs = torch.randperm(num_slots * num_kv_heads, device=device)[:n]  # distinct pairs
    dst_loc = ((pairs // num_kv_heads) * page_size + page_size // 2).to(loc_dtype)  # unaligned
    dst_head = (pairs % num_kv_heads).to(torch.int32)
    return staging, k, v, dst_loc, dst_head


def _loop_scatter(staging: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  dst_loc: torch.Tensor, dst_head: torch.Tensor, n_valid: int) -> None:
    """Independent statement of the spec, one entry at a time."""
    page_size = staging.shape[2]
    for i in range(n_valid):
        r, h = int(dst_loc[i]), int(dst_head[i])
        k[r : r + page_size, h] = staging[i, 0]
        v[r : r + page_size, h] = staging[i, 1]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("num_valid", [None, 3, 0], ids=["all", "nv3", "nv0"])
@pytest.mark.parametrize("head_dim", [24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("num_kv_heads", [1, 3, 8], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("page_size", [16, 32], ids=lambda p: f"P{p}")
def test_recall_scatter_matches_ref(
    page_size: int, num_kv_heads: int, head_dim: int, num_valid: int | None, dtype: str,
    device: torch.device,
) -> None:
    n = 5
    staging, k, v, dst_loc, dst_head = _make_recall(n, page_size, num_kv_heads, head_dim,
                                                    DTYPES[dtype], device)
    nv = None if num_valid is None else torch.tensor([num_valid], dtype=torch.int32,
                                                     device=device)
    k0, v0 = k.clone(), v.clone()
    k_ref, v_ref = k.clone(), v.clone()
    k_loop, v_loop = k.clone(), v.clone()
    recall_scatter(staging, k, v, dst_loc, dst_head, nv, impl="triton")
    ref_recall_scatter(staging, k_ref, v_ref, dst_loc, dst_head, nv)
    _loop_scatter(staging, k_loop, v_loop, dst_loc, dst_head, n if num_valid is None else num_valid)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k_ref, k_loop) and torch.equal(v_ref, v_loop)
    # Only the targeted (row, head) cells changed; other heads of the same rows did not.
    written = torch.zeros(k.shape[:2], dtype=torch.bool, device=device)  # [num_rows, H]
    for i in range(n if num_valid is None else num_valid):
        r = int(dst_loc[i])
        written[r : r + page_size, int(dst_head[i])] = True
    assert torch.equal(k[~written], k0[~written]) and torch.equal(v[~written], v0[~written])


def test_recall_scatter_int32_loc_and_strided(device: torch.device) -> None:
    """int32 dst_loc, a strided staging view and K/V buffers that are views of one tensor."""
    staging, k, _, dst_loc, dst_head = _make_recall(4, 16, 2, 24, torch.float32, device,
                                                    torch.int32)
    kv = torch.randn(2, *k.shape, device=device)  # one allocation for both buffers
    wide = torch.randn(4, 2, 16, 40, device=device)
    wide[..., :24] = staging
    staged = wide[..., :24]  # [4, 2, 16, 24], stride (1280, 640, 40, 1)
    kv_ref = kv.clone()
    recall_scatter(staged, kv[0], kv[1], dst_loc, dst_head, impl="triton")
    ref_recall_scatter(staging, kv_ref[0], kv_ref[1], dst_loc, dst_head)
    assert torch.equal(kv, kv_ref)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("num_kv_heads", [1, 3], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("page_size", [16, 32], ids=lambda p: f"P{p}")
def test_backup_gather_matches_ref(page_size: int, num_kv_heads: int, head_dim: int,
                                   dtype: str, device: torch.device) -> None:
    num_rows = 5 * page_size + 7
    k = torch.randn(num_rows, num_kv_heads, head_dim, device=device).to(DTYPES[dtype])
    v = torch.randn(num_rows, num_kv_heads, head_dim, device=device).to(DTYPES[dtype])
    src_loc = torch.tensor([7, 3 * page_size, 0, num_rows - page_size], device=device)
    out = backup_gather(k, v, src_loc, page_size, impl="triton")
    ref = ref_backup_gather(k, v, src_loc, page_size)
    assert out.shape == (4, num_kv_heads, 2, page_size, head_dim)
    assert out.dtype == k.dtype and out.is_contiguous()
    assert torch.equal(out, ref)
    for i, r in enumerate(src_loc.tolist()):
        assert torch.equal(ref[i, :, 0], k[r : r + page_size].transpose(0, 1))
        assert torch.equal(ref[i, :, 1], v[r : r + page_size].transpose(0, 1))


def test_backup_then_recall_round_trip(device: torch.device) -> None:
    """Back up 3 pages, recall every (page, head) block into fresh slots: same rows."""
    page_size, num_kv_heads = 16, 3
    k = torch.randn(3 * page_size, num_kv_heads, 24, device=device)
    v = torch.randn(3 * page_size, num_kv_heads, 24, device=device)
    src_loc = torch.arange(3, device=device, dtype=torch.int32) * page_size
    blocks = backup_gather(k, v, src_loc, page_size, impl="triton")  # [3, H, 2, P, D]
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
    staging = blocks.flatten(0, 1)  # [3 * H, 2, P, D]
    dst_loc = src_loc.long().repeat_interleave(num_kv_heads)  # [3 * H]
    dst_head = torch.arange(num_kv_heads, device=device, dtype=torch.int32).repeat(3)
    recall_scatter(staging, k2, v2, dst_loc, dst_head, impl="triton")
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_empty_lists(device: torch.device) -> None:
    k = torch.randn(32, 2, 24, device=device)
    v = torch.randn(32, 2, 24, device=device)
    k0 = k.clone()
    empty_loc = torch.empty(0, dtype=torch.int64, device=device)
    recall_scatter(torch.empty(0, 2, 16, 24, device=device), k, v, empty_loc,
                   torch.empty(0, dtype=torch.int32, device=device), impl="triton")
    assert torch.equal(k, k0)
    assert backup_gather(k, v, empty_loc, 16, impl="triton").shape == (0, 2, 2, 16, 24)


def test_scatter_routes_cpu_to_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    staging, k, v, dst_loc, dst_head = _make_recall(3, 16, 2, 24, torch.float32,
                                                    torch.device("cpu"))
    k_ref, v_ref = k.clone(), v.clone()

    class _Boom:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("Triton kernel launched for CPU tensors")

    monkeypatch.setattr(scatter_mod, "_recall_scatter_kernel", _Boom())
    monkeypatch.setattr(scatter_mod, "_backup_gather_kernel", _Boom())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    recall_scatter(staging, k, v, dst_loc, dst_head)
    ref_recall_scatter(staging, k_ref, v_ref, dst_loc, dst_head)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(backup_gather(k, v, dst_loc, 16), ref_backup_gather(k, v, dst_loc, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(AssertionError, match="launched"):
        recall_scatter(staging, k, v, dst_loc, dst_head)
    with pytest.raises(AssertionError, match="launched"):
        backup_gather(k, v, dst_loc, 16)


def _scatter_args() -> dict[str, object]:
    staging, k, v, dst_loc, dst_head = _make_recall(3, 16, 2, 24, torch.float32,
                                                    torch.device("cpu"))
    return dict(staging=staging, k_buffer=k, v_buffer=v, dst_loc=dst_loc, dst_head=dst_head,
                num_valid=None)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(staging=torch.randn(3, 3, 16, 24)), "staging"),
        (dict(staging=torch.randn(3, 2, 16, 24, dtype=torch.bfloat16)), "staging"),
        (dict(v_buffer=torch.randn(40, 2, 24)), "v_buffer"),
        (dict(k_buffer=torch.randn(40, 24)), "k_buffer"),
        (dict(dst_loc=torch.zeros(4, dtype=torch.int64)), "dst_loc"),
        (dict(dst_loc=torch.zeros(3)), "dst_loc"),
        (dict(dst_head=torch.zeros(3, 1, dtype=torch.int32)), "dst_head"),
        (dict(num_valid=torch.zeros(2, dtype=torch.int32)), "num_valid"),
        (dict(num_valid=torch.zeros(1)), "num_valid"),
    ],
    ids=["staging_shape", "staging_dtype", "v_shape", "k_rank", "loc_shape", "loc_dtype",
         "head_rank", "nv_shape", "nv_dtype"],
)
def test_recall_scatter_validation(kwargs: dict[str, object], name: str) -> None:
    args = _scatter_args()
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        recall_scatter(**args)  # type: ignore[arg-type]


def test_backup_gather_validation() -> None:
    k = torch.randn(40, 2, 24)
    with pytest.raises(ValueError, match="Invalid shape of src_loc"):
        backup_gather(k, k, torch.zeros(2, 1, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="v_buffer"):
        backup_gather(k, k.half(), torch.zeros(2, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="page_size"):
        backup_gather(k, k, torch.zeros(2, dtype=torch.int64), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_scatter_gather_gpu_large(dtype: str) -> None:
    dev = torch.device("cuda")
    staging, k, v, dst_loc, dst_head = _make_recall(2048, 32, 8, 128, DTYPES[dtype], dev)
    nv = torch.tensor([1500], dtype=torch.int32, device=dev)
    k_ref, v_ref = k.clone(), v.clone()
    recall_scatter(staging, k, v, dst_loc, dst_head, nv)
    ref_recall_scatter(staging, k_ref, v_ref, dst_loc, dst_head, nv)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    src = torch.arange(0, k.shape[0] - 32, 32, device=dev)
    assert torch.equal(backup_gather(k, v, src, 32), ref_backup_gather(k, v, src, 32))
