"""page_digest: Triton kernel vs ref_page_digest vs a per-page loop; exact equality."""

from __future__ import annotations

import pytest
import torch

import sglang_freekv.kernels.digest as digest_mod
from sglang_freekv.kernels import page_digest, ref_page_digest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _make_pages(
    n: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, partial: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """n pages at shuffled, non-aligned row offsets; the last page ends at the buffer's end
    when ``partial`` (so its invalid tail rows do not exist)."""
    num_rows = (n + 1) * page_size + 3
    k = torch.randn(num_rows, num_kv_heads, head_dim, device=device).to(dtype)
    slots = torch.randperm(n, device=device) * page_size + 3  # [n] first rows
    page_len = None
    if partial:
        page_len = torch.full((n,), page_size, dtype=torch.int32, device=device)
        page_len[-1] = 5  # partial last page ...
        page_len[0] = 1  # ... and a one-token page
        slots[-1] = num_rows - 5  # rows past the valid tail would be out of bounds
    return k, slots, page_len


def _loop_digest(k: torch.Tensor, loc: torch.Tensor, page_size: int,
                 page_len: torch.Tensor | None) -> torch.Tensor:
    """Independent statement of the spec: one page at a time."""
    out = []
    for i in range(loc.shape[0]):
        n_tok = page_size if page_len is None else int(page_len[i])
        rows = k[int(loc[i]) : int(loc[i]) + n_tok]  # [n_tok, H, D]
        out.append(torch.stack([rows.amin(0), rows.amax(0)], dim=1))  # [H, 2, D]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("head_dim", [24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("num_kv_heads", [1, 3], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("page_size", [16, 32], ids=lambda p: f"P{p}")
def test_page_digest_matches_ref(
    page_size: int, num_kv_heads: int, head_dim: int, partial: bool, dtype: str,
    device: torch.device,
) -> None:
    k, loc, page_len = _make_pages(5, page_size, num_kv_heads, head_dim, DTYPES[dtype], device,
                                   partial)
    out = page_digest(k, loc, page_size, page_len, impl="triton")
    ref = ref_page_digest(k, loc, page_size, page_len)
    assert out.shape == (5, num_kv_heads, 2, head_dim)
    assert out.dtype == k.dtype and out.is_contiguous()
    assert torch.equal(out, ref)  # min/max involve no rounding
    assert torch.equal(ref, _loop_digest(k, loc, page_size, page_len))
    assert bool((out[:, :, 0] <= out[:, :, 1]).all())


@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_page_digest_strided_buffer(loc_dtype: torch.dtype, device: torch.device) -> None:
    """A head_dim slice of a wider buffer (row and head strides != dense) is read correctly."""
    wide = torch.randn(70, 2, 40, device=device)
    k = wide[:, :, :24]  # [70, 2, 24], stride (80, 40, 1)
    loc = torch.tensor([0, 33, 50], dtype=loc_dtype, device=device)
    assert torch.equal(page_digest(k, loc, 16, impl="triton"), ref_page_digest(k, loc, 16))


def test_page_digest_empty(device: torch.device) -> None:
    k = torch.randn(8, 2, 24, device=device)
    loc = torch.empty(0, dtype=torch.int32, device=device)
    assert page_digest(k, loc, 16, impl="triton").shape == (0, 2, 2, 24)
    assert ref_page_digest(k, loc, 16).shape == (0, 2, 2, 24)


def test_page_digest_routes_cpu_to_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors run the reference when the interpreter is off; impl= overrides."""
    k = torch.randn(40, 2, 24)
    loc = torch.tensor([0, 16], dtype=torch.int32)

    class _Boom:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("Triton kernel launched for CPU tensors")

    monkeypatch.setattr(digest_mod, "_page_digest_kernel", _Boom())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(page_digest(k, loc, 16), ref_page_digest(k, loc, 16))
    with pytest.raises(ValueError, match="impl"):
        page_digest(k, loc, 16, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(AssertionError, match="launched"):
        page_digest(k, loc, 16)
    assert torch.equal(page_digest(k, loc, 16, impl="ref"), ref_page_digest(k, loc, 16))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(k_buffer=torch.randn(40, 24)), "k_buffer"),
        (dict(k_buffer=torch.zeros(40, 2, 24, dtype=torch.int32)), "k_buffer"),
        (dict(page_loc=torch.zeros(2, 1, dtype=torch.int32)), "page_loc"),
        (dict(page_loc=torch.zeros(2)), "page_loc"),
        (dict(page_len=torch.ones(3, dtype=torch.int32)), "page_len"),
        (dict(page_size=0), "page_size"),
        (dict(impl="cuda"), "impl"),
    ],
    ids=["k_rank", "k_dtype", "loc_rank", "loc_dtype", "len_shape", "page_size", "impl"],
)
def test_page_digest_validation(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(
        k_buffer=torch.randn(40, 2, 24), page_loc=torch.zeros(2, dtype=torch.int32),
        page_size=16, page_len=None, impl=None,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        page_digest(**args)  # type: ignore[arg-type]


def test_page_digest_shape_message() -> None:
    with pytest.raises(ValueError, match=r"Invalid shape of page_len: expected \[2\], got \[3\]"):
        page_digest(torch.randn(40, 2, 24), torch.zeros(2, dtype=torch.int32), 16,
                    torch.ones(3, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_page_digest_gpu_large(dtype: str) -> None:
    k, loc, page_len = _make_pages(4096, 32, 8, 128, DTYPES[dtype], torch.device("cuda"), True)
    assert torch.equal(page_digest(k, loc, 32, page_len), ref_page_digest(k, loc, 32, page_len))
