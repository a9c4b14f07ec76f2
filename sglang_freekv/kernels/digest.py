"""Page digests: per-page, per-KV-head elementwise min/max of the (post-RoPE) keys.

The digest is the Quest box of freekv-method.md §1.2 (the accuracy-run variant: exact
per-dimension min and max over the page's tokens). It is read by ``select.py``.

* ``_page_digest_kernel`` — Triton kernel, one program per (page, KV head).
* :func:`page_digest` — launcher: validates, allocates, routes CPU tensors to the reference.
* :func:`ref_page_digest` — the PyTorch reference (the spec).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_positive_int,
    check_same_device,
    check_tensor,
    next_power_of_2,
    resolve_impl,
)

__all__ = ["page_digest", "ref_page_digest"]


@triton.jit
def _page_digest_kernel(
    k_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    loc_ptr,  # [n] first row of each page
    len_ptr,  # [n] valid tokens per page (unused unless HAS_LEN)
    out_ptr,  # [n, num_kv_heads, 2, head_dim] contiguous
    stride_kr,
    stride_kh,
    page_size,
    num_kv_heads,
    head_dim,
    HAS_LEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    # int64 row offsets: num_rows * num_kv_heads * head_dim may exceed 2**31.
    start = tl.load(loc_ptr + i).to(tl.int64)
    if HAS_LEN:
        n_tok = tl.load(len_ptr + i).to(tl.int32)
    else:
        n_tok = page_size
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    kmin = tl.full([BLOCK_D], float("inf"), tl.float32)
    kmax = tl.full([BLOCK_D], float("-inf"), tl.float32)
    # Walk the page in BLOCK_T-token chunks; padding tokens load +-inf so they never win.
    for t0 in range(0, page_size, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = ((offs_t < n_tok) & (offs_t < page_size))[:, None] & mask_d[None, :]
        ptrs = (
            k_ptr
            + (start + offs_t.to(tl.int64))[:, None] * stride_kr
            + h.to(tl.int64) * stride_kh
            + offs_d[None, :]
        )  # [BLOCK_T, BLOCK_D]
        x_lo = tl.load(ptrs, mask=mask, other=float("inf")).to(tl.float32)
        x_hi = tl.where(mask, x_lo, float("-inf"))
        kmin = tl.minimum(kmin, tl.min(x_lo, axis=0))
        kmax = tl.maximum(kmax, tl.max(x_hi, axis=0))
    out = out_ptr + (i.to(tl.int64) * num_kv_heads + h) * 2 * head_dim
    tl.store(out + offs_d, kmin.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(out + head_dim + offs_d, kmax.to(out_ptr.dtype.element_ty), mask=mask_d)


def _check_args(
    k_buffer: torch.Tensor,
    page_loc: torch.Tensor,
    page_size: int,
    page_len: torch.Tensor | None,
) -> None:
    check_tensor("k_buffer", k_buffer, shape=(None, None, None), dtype=FLOAT_DTYPES,
                 last_dim_contiguous=True)
    check_tensor("page_loc", page_loc, shape=(None,), dtype=INDEX_DTYPES)
    n = page_loc.shape[0]
    if page_len is not None:
        check_tensor("page_len", page_len, shape=(n,), dtype=INDEX_DTYPES)
    check_same_device("k_buffer", k_buffer, page_loc=page_loc, page_len=page_len)
    check_positive_int("page_size", page_size)


def page_digest(
    k_buffer: torch.Tensor,
    page_loc: torch.Tensor,
    page_size: int,
    page_len: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Per-page, per-KV-head elementwise min and max of the keys.

    Parameters
    ----------
    k_buffer : torch.Tensor
        shape ``[num_rows, num_kv_heads, head_dim]`` (NHD), dtype fp32/fp16/bf16,
        cpu or cuda; stride 1 in ``head_dim``.
    page_loc : torch.Tensor
        shape ``[n]``, dtype int32/int64, same device. Page ``i`` is the rows
        ``page_loc[i] .. page_loc[i] + page_size - 1``.
    page_size : int
        tokens per page (``P``).
    page_len : torch.Tensor, optional
        shape ``[n]``, dtype int32 (int64 accepted): valid tokens per page, in
        ``1..page_size`` (partial last pages). Default: every page is full.
        Rows past ``page_len[i]`` are never read.
    impl : str, optional
        ``"triton"`` or ``"ref"``; default Triton for CUDA tensors (or under
        ``TRITON_INTERPRET=1``), else the reference.

    Returns
    -------
    torch.Tensor
        shape ``[n, num_kv_heads, 2, head_dim]``, dtype of ``k_buffer``, same device,
        contiguous; ``[..., 0, :]`` = min, ``[..., 1, :]`` = max. Exact (no rounding).

    Note
    ----
    No host sync; graph-capturable on CUDA.
    """
    _check_args(k_buffer, page_loc, page_size, page_len)
    if resolve_impl(impl, k_buffer) == "ref":
        return ref_page_digest(k_buffer, page_loc, page_size, page_len)
    _, num_kv_heads, head_dim = k_buffer.shape
    n = page_loc.shape[0]
    out = torch.empty(
        (n, num_kv_heads, 2, head_dim), dtype=k_buffer.dtype, device=k_buffer.device
    )  # [n, num_kv_heads, 2, head_dim]
    if n == 0 or num_kv_heads == 0 or head_dim == 0:
        return out
    _page_digest_kernel[(n, num_kv_heads)](
        k_buffer,
        page_loc,
        page_len if page_len is not None else page_loc,  # dummy pointer when HAS_LEN=False
        out,
        k_buffer.stride(0),
        k_buffer.stride(1),
        page_size,
        num_kv_heads,
        head_dim,
        HAS_LEN=page_len is not None,
        BLOCK_T=min(next_power_of_2(page_size), 32),
        BLOCK_D=next_power_of_2(head_dim),
    )
    return out


def ref_page_digest(
    k_buffer: torch.Tensor,
    page_loc: torch.Tensor,
    page_size: int,
    page_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`page_digest` (same arguments and result)."""
    _check_args(k_buffer, page_loc, page_size, page_len)
    num_rows, num_kv_heads, head_dim = k_buffer.shape
    n = page_loc.shape[0]
    device = k_buffer.device
    offs = torch.arange(page_size, device=device)  # [page_size]
    rows = page_loc.long()[:, None] + offs[None, :]  # [n, page_size]
    if page_len is None:
        valid = torch.ones((n, page_size), dtype=torch.bool, device=device)
    else:
        valid = offs[None, :] < page_len.long()[:, None]  # [n, page_size]
    # Rows of the invalid tail may lie past the buffer's end: clamp, then mask them out.
    rows = torch.where(valid, rows, torch.zeros_like(rows)).clamp_(max=max(num_rows - 1, 0))
    keys = k_buffer[rows].float()  # [n, page_size, num_kv_heads, head_dim] fp32
    v = valid[:, :, None, None]
    kmin = torch.where(v, keys, float("inf")).amin(dim=1)  # [n, num_kv_heads, head_dim]
    kmax = torch.where(v, keys, float("-inf")).amax(dim=1)  # [n, num_kv_heads, head_dim]
    out = torch.stack([kmin, kmax], dim=2)  # [n, num_kv_heads, 2, head_dim]
    return out.to(k_buffer.dtype).contiguous()
