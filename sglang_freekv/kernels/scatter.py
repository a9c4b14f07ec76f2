"""Layout conversion between the host tier (HND blocks) and the device KV (NHD rows).

freekv-method.md §4: the host keeps one contiguous ``[2, page_size, head_dim]`` block per
(page, KV head) (index 0 = K, 1 = V) so a recall is one large H2D copy per block; the
device keeps SGLang's NHD rows ``[num_rows, num_kv_heads, head_dim]``.

* ``_recall_scatter_kernel`` / :func:`recall_scatter`: staged HND blocks -> one KV head's
  column of ``page_size`` device rows (recall, after the H2D copy into ``staging``).
* ``_backup_gather_kernel`` / :func:`backup_gather`: device rows of whole pages -> HND
  blocks (write-through backup, before the D2H copy).
* :func:`ref_recall_scatter`, :func:`ref_backup_gather` — the PyTorch references (the spec).
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

__all__ = ["recall_scatter", "backup_gather", "ref_recall_scatter", "ref_backup_gather"]


@triton.jit
def _recall_scatter_kernel(
    st_ptr,  # [n, 2, page_size, head_dim] staging (HND blocks)
    k_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    v_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    loc_ptr,  # [n] first destination row
    head_ptr,  # [n] destination KV head
    nv_ptr,  # [1] number of valid entries (unused unless HAS_NUM_VALID)
    stride_sn,
    stride_skv,
    stride_st,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    page_size,
    head_dim,
    HAS_NUM_VALID: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < page_size)[:, None] & (offs_d < head_dim)[None, :]
    if HAS_NUM_VALID:
        # Padded entries past num_valid[0] are skipped entirely (no host sync needed).
        mask = mask & (i < tl.load(nv_ptr))
    row = tl.load(loc_ptr + i).to(tl.int64) + offs_t.to(tl.int64)  # [BLOCK_T]
    head = tl.load(head_ptr + i).to(tl.int64)
    src = st_ptr + i.to(tl.int64) * stride_sn + offs_t[:, None] * stride_st + offs_d[None, :]
    k = tl.load(src, mask=mask)
    v = tl.load(src + stride_skv, mask=mask)
    tl.store(k_ptr + row[:, None] * stride_kr + head * stride_kh + offs_d[None, :], k, mask=mask)
    tl.store(v_ptr + row[:, None] * stride_vr + head * stride_vh + offs_d[None, :], v, mask=mask)


@triton.jit
def _backup_gather_kernel(
    k_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    v_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    loc_ptr,  # [n] first row of each page
    out_ptr,  # [n, num_kv_heads, 2, page_size, head_dim] contiguous HND
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    page_size,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    offs_d = tl.arange(0, BLOCK_D)
    start = tl.load(loc_ptr + i).to(tl.int64)
    block = (i.to(tl.int64) * num_kv_heads + h) * 2 * page_size * head_dim
    for t0 in range(0, page_size, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < page_size)[:, None] & (offs_d < head_dim)[None, :]
        row = start + offs_t.to(tl.int64)  # [BLOCK_T]
        k = tl.load(k_ptr + row[:, None] * stride_kr + h * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + row[:, None] * stride_vr + h * stride_vh + offs_d[None, :], mask=mask)
        dst = out_ptr + block + offs_t[:, None] * head_dim + offs_d[None, :]
        tl.store(dst, k, mask=mask)
        tl.store(dst + page_size * head_dim, v, mask=mask)


def _check_kv(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    check_tensor("k_buffer", k_buffer, shape=(None, None, None), dtype=FLOAT_DTYPES,
                 last_dim_contiguous=True)
    check_tensor("v_buffer", v_buffer, shape=tuple(k_buffer.shape), dtype=k_buffer.dtype,
                 last_dim_contiguous=True)
    check_same_device("k_buffer", k_buffer, v_buffer=v_buffer)


def _check_scatter_args(
    staging: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    dst_loc: torch.Tensor,
    dst_head: torch.Tensor,
    num_valid: torch.Tensor | None,
) -> None:
    _check_kv(k_buffer, v_buffer)
    head_dim = k_buffer.shape[2]
    check_tensor("staging", staging, shape=(None, 2, None, head_dim), dtype=k_buffer.dtype,
                 last_dim_contiguous=True)
    n = staging.shape[0]
    check_tensor("dst_loc", dst_loc, shape=(n,), dtype=INDEX_DTYPES)
    check_tensor("dst_head", dst_head, shape=(n,), dtype=INDEX_DTYPES)
    if num_valid is not None:
        check_tensor("num_valid", num_valid, shape=(1,), dtype=INDEX_DTYPES)
    check_same_device("k_buffer", k_buffer, staging=staging, dst_loc=dst_loc, dst_head=dst_head,
                      num_valid=num_valid)


def recall_scatter(
    staging: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    dst_loc: torch.Tensor,
    dst_head: torch.Tensor,
    num_valid: torch.Tensor | None = None,
    impl: str | None = None,
) -> None:
    """Scatter staged HND page blocks into one KV head's column of device NHD rows.

    For every ``i < n`` (and ``i < num_valid[0]`` when given) and ``t < page_size``::

        k_buffer[dst_loc[i] + t, dst_head[i], :] = staging[i, 0, t, :]
        v_buffer[dst_loc[i] + t, dst_head[i], :] = staging[i, 1, t, :]

    Other heads' columns are never written.

    Parameters
    ----------
    staging : torch.Tensor
        shape ``[n, 2, page_size, head_dim]`` (HND blocks: 0 = K, 1 = V), dtype of
        ``k_buffer``, same device; stride 1 in ``head_dim``.
    k_buffer, v_buffer : torch.Tensor
        shape ``[num_rows, num_kv_heads, head_dim]`` (NHD), same float dtype; written in place.
    dst_loc : torch.Tensor
        shape ``[n]``, int64/int32: first row of each destination slot.
    dst_head : torch.Tensor
        shape ``[n]``, int32 (int64 accepted): destination KV head.
    num_valid : torch.Tensor, optional
        shape ``[1]``, int32 (int64 accepted), same device: entries ``i >= num_valid[0]``
        are skipped, so a padded list needs no host sync.
    impl : str, optional
        ``"triton"`` | ``"ref"``; default by device.

    Note
    ----
    No host sync on the Triton path. Destinations must not overlap (else unspecified).
    """
    _check_scatter_args(staging, k_buffer, v_buffer, dst_loc, dst_head, num_valid)
    if resolve_impl(impl, k_buffer) == "ref":
        ref_recall_scatter(staging, k_buffer, v_buffer, dst_loc, dst_head, num_valid)
        return
    n, _, page_size, head_dim = staging.shape
    if n == 0 or page_size == 0 or head_dim == 0:
        return
    block_t = min(next_power_of_2(page_size), 32)
    _recall_scatter_kernel[(n, triton.cdiv(page_size, block_t))](
        staging, k_buffer, v_buffer, dst_loc, dst_head,
        num_valid if num_valid is not None else dst_loc,  # dummy pointer when unused
        staging.stride(0), staging.stride(1), staging.stride(2),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        page_size, head_dim,
        HAS_NUM_VALID=num_valid is not None,
        BLOCK_T=block_t,
        BLOCK_D=next_power_of_2(head_dim),
    )  # fmt: skip


def backup_gather(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    src_loc: torch.Tensor,
    page_size: int,
    impl: str | None = None,
) -> torch.Tensor:
    """Gather whole pages of device NHD rows into contiguous HND blocks.

    Parameters
    ----------
    k_buffer, v_buffer : torch.Tensor
        shape ``[num_rows, num_kv_heads, head_dim]`` (NHD), same float dtype and device.
    src_loc : torch.Tensor
        shape ``[n]``, int64/int32: first row of each page (rows ``src_loc[i] ..
        src_loc[i] + page_size - 1`` must exist).
    page_size : int
        tokens per page (``P``).
    impl : str, optional
        ``"triton"`` | ``"ref"``; default by device.

    Returns
    -------
    torch.Tensor
        shape ``[n, num_kv_heads, 2, page_size, head_dim]`` (HND), dtype of ``k_buffer``,
        same device, contiguous: ``out[i, h, 0, t] = k_buffer[src_loc[i] + t, h]``
        and ``out[i, h, 1, t] = v_buffer[src_loc[i] + t, h]``.
    """
    _check_kv(k_buffer, v_buffer)
    check_tensor("src_loc", src_loc, shape=(None,), dtype=INDEX_DTYPES)
    check_same_device("k_buffer", k_buffer, src_loc=src_loc)
    check_positive_int("page_size", page_size)
    if resolve_impl(impl, k_buffer) == "ref":
        return ref_backup_gather(k_buffer, v_buffer, src_loc, page_size)
    _, num_kv_heads, head_dim = k_buffer.shape
    n = src_loc.shape[0]
    out = torch.empty(
        (n, num_kv_heads, 2, page_size, head_dim), dtype=k_buffer.dtype, device=k_buffer.device
    )  # [n, num_kv_heads, 2, page_size, head_dim] HND
    if n == 0 or num_kv_heads == 0 or head_dim == 0:
        return out
    _backup_gather_kernel[(n, num_kv_heads)](
        k_buffer, v_buffer, src_loc, out,
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        page_size, head_dim,
        BLOCK_T=min(next_power_of_2(page_size), 32),
        BLOCK_D=next_power_of_2(head_dim),
    )  # fmt: skip
    return out


def ref_recall_scatter(
    staging: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    dst_loc: torch.Tensor,
    dst_head: torch.Tensor,
    num_valid: torch.Tensor | None = None,
) -> None:
    """PyTorch reference of :func:`recall_scatter` (reads ``num_valid``: syncs on CUDA)."""
    _check_scatter_args(staging, k_buffer, v_buffer, dst_loc, dst_head, num_valid)
    n, _, page_size, _ = staging.shape
    if num_valid is not None:
        n = max(0, min(n, int(num_valid[0])))
    rows = dst_loc[:n].long()[:, None] + torch.arange(page_size, device=dst_loc.device)
    heads = dst_head[:n].long()[:, None].expand(n, page_size)  # [n, page_size]
    k_buffer[rows, heads] = staging[:n, 0]  # [n, page_size, head_dim]
    v_buffer[rows, heads] = staging[:n, 1]  # [n, page_size, head_dim]


def ref_backup_gather(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    src_loc: torch.Tensor,
    page_size: int,
) -> torch.Tensor:
    """PyTorch reference of :func:`backup_gather` (same arguments and result)."""
    _check_kv(k_buffer, v_buffer)
    check_tensor("src_loc", src_loc, shape=(None,), dtype=INDEX_DTYPES)
    check_positive_int("page_size", page_size)
    rows = src_loc.long()[:, None] + torch.arange(page_size, device=src_loc.device)  # [n, P]
    k = k_buffer[rows].transpose(1, 2)  # [n, num_kv_heads, page_size, head_dim]
    v = v_buffer[rows].transpose(1, 2)  # [n, num_kv_heads, page_size, head_dim]
    return torch.stack([k, v], dim=2).contiguous()  # [n, num_kv_heads, 2, P, head_dim] HND
