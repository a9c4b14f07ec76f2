"""Recall and write-through that read / write the host tier directly (no host involvement).

On CUDA the host tier is page-locked and mapped into the device's address space
(``cudaHostRegister`` with the mapped flag, ``pool_host.pin_host_tensor``), so a kernel can
load a host block over PCIe by address, and store into one: no host-side gather, no list
copied to the host, no ``cudaMemcpy`` per block. Both kernels take fixed-size, padded index
lists (entries past ``num_valid`` or with ``valid`` False are skipped), so the decode step
launches them unconditionally: no host sync, graph-capturable.

* ``_recall_direct_kernel`` / :func:`recall_direct`: host HND blocks
  ``host[host_ids[i], heads[i]]`` (``[2, P, D]``) -> KV head ``heads[i]``'s column of the ``P``
  device rows from ``dst_loc[i]`` (NHD).
* ``_backup_direct_kernel`` / :func:`backup_direct`: whole device pages (rows ``src_loc[i] ..
  + P``, every head) -> host blocks ``host[host_ids[i], h]`` (write-through of completed pages).
* :func:`ref_recall_direct`, :func:`ref_backup_direct` — the PyTorch references (the spec).

On CPU tensors (tests, ``TRITON_INTERPRET=1``) ``host`` is an ordinary tensor.
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

__all__ = ["backup_direct", "recall_direct", "ref_backup_direct", "ref_recall_direct"]


@triton.jit
def _recall_direct_kernel(
    host_ptr,  # [num_pages, num_kv_heads, 2, page_size, head_dim] HND (host, mapped)
    ids_ptr,  # [n] host page id
    head_ptr,  # [n] KV head
    loc_ptr,  # [n] first destination row
    nv_ptr,  # [1] number of valid entries
    k_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    v_ptr,
    stride_hp,
    stride_hh,
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
    if i < tl.load(nv_ptr):
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < page_size)[:, None] & (offs_d < head_dim)[None, :]
        page = tl.load(ids_ptr + i).to(tl.int64)
        head = tl.load(head_ptr + i).to(tl.int64)
        row = tl.load(loc_ptr + i).to(tl.int64) + offs_t.to(tl.int64)  # [BLOCK_T]
        src = host_ptr + page * stride_hp + head * stride_hh \
            + offs_t[:, None] * head_dim + offs_d[None, :]
        k = tl.load(src, mask=mask)
        v = tl.load(src + page_size * head_dim, mask=mask)
        tl.store(k_ptr + row[:, None] * stride_kr + head * stride_kh + offs_d[None, :], k,
                 mask=mask)
        tl.store(v_ptr + row[:, None] * stride_vr + head * stride_vh + offs_d[None, :], v,
                 mask=mask)


@triton.jit
def _backup_direct_kernel(
    k_ptr,  # [num_rows, num_kv_heads, head_dim] NHD
    v_ptr,
    loc_ptr,  # [n] first row of each page
    ids_ptr,  # [n] destination host page id
    valid_ptr,  # [n] bool (int8): write this entry
    host_ptr,  # [num_pages, num_kv_heads, 2, page_size, head_dim] HND (host, mapped)
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_hp,
    stride_hh,
    page_size,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    if tl.load(valid_ptr + i) != 0:
        offs_d = tl.arange(0, BLOCK_D)
        start = tl.load(loc_ptr + i).to(tl.int64)
        block = host_ptr + tl.load(ids_ptr + i).to(tl.int64) * stride_hp + h * stride_hh
        for t0 in range(0, page_size, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < page_size)[:, None] & (offs_d < head_dim)[None, :]
            row = start + offs_t.to(tl.int64)
            k = tl.load(k_ptr + row[:, None] * stride_kr + h * stride_kh + offs_d[None, :],
                        mask=mask)
            v = tl.load(v_ptr + row[:, None] * stride_vr + h * stride_vh + offs_d[None, :],
                        mask=mask)
            dst = block + offs_t[:, None] * head_dim + offs_d[None, :]
            tl.store(dst, k, mask=mask)
            tl.store(dst + page_size * head_dim, v, mask=mask)


def _check_host(host: torch.Tensor, k_buffer: torch.Tensor) -> None:
    check_tensor("k_buffer", k_buffer, shape=(None, None, None), dtype=FLOAT_DTYPES,
                 last_dim_contiguous=True)
    _, h, d = k_buffer.shape
    check_tensor("host", host, shape=(None, h, 2, None, d), dtype=k_buffer.dtype)
    if host.stride(-1) != 1 or host.stride(-2) != d or host.stride(-3) != host.shape[-2] * d:
        raise ValueError("Invalid layout of host: expected contiguous [2, page_size, head_dim] "
                         "blocks")


def recall_direct(
    host: torch.Tensor,
    host_ids: torch.Tensor,
    heads: torch.Tensor,
    dst_loc: torch.Tensor,
    num_valid: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    impl: str | None = None,
) -> None:
    """Copy host blocks straight into one KV head's column of device rows.

    For every ``i < num_valid[0]`` and ``t < page_size``::

        k_buffer[dst_loc[i] + t, heads[i]] = host[host_ids[i], heads[i], 0, t]
        v_buffer[dst_loc[i] + t, heads[i]] = host[host_ids[i], heads[i], 1, t]

    Parameters
    ----------
    host : torch.Tensor
        shape ``[num_pages, num_kv_heads, 2, page_size, head_dim]`` (HND), dtype of
        ``k_buffer``: one layer of the host tier. With CUDA buffers it must be host memory
        registered as mapped (``pool_host.pin_host_tensor``); the kernel reads it by address.
    host_ids, heads, dst_loc : torch.Tensor
        shape ``[n]``, int32/int64, on the KV device: source page, KV head, first
        destination row. Entries past ``num_valid[0]`` may hold anything.
    num_valid : torch.Tensor
        shape ``[1]``, int32/int64, on the KV device.
    k_buffer, v_buffer : torch.Tensor
        shape ``[num_rows, num_kv_heads, head_dim]`` (NHD), same dtype; written in place.
    impl : str, optional
        ``"triton"`` | ``"ref"``; default by device.

    Note
    ----
    No host sync on the Triton path; graph-capturable. Destinations must not overlap.
    """
    _check_host(host, k_buffer)
    check_tensor("v_buffer", v_buffer, shape=tuple(k_buffer.shape), dtype=k_buffer.dtype,
                 last_dim_contiguous=True)
    n = host_ids.shape[0]
    for name, t in (("host_ids", host_ids), ("heads", heads), ("dst_loc", dst_loc)):
        check_tensor(name, t, shape=(n,), dtype=INDEX_DTYPES)
    check_tensor("num_valid", num_valid, shape=(1,), dtype=INDEX_DTYPES)
    check_same_device("k_buffer", k_buffer, v_buffer=v_buffer, host_ids=host_ids, heads=heads,
                      dst_loc=dst_loc, num_valid=num_valid)
    if resolve_impl(impl, k_buffer) == "ref":
        ref_recall_direct(host, host_ids, heads, dst_loc, num_valid, k_buffer, v_buffer)
        return
    page_size, head_dim = host.shape[3], host.shape[4]
    if n == 0:
        return
    block_t = min(next_power_of_2(page_size), 32)
    _recall_direct_kernel[(n, triton.cdiv(page_size, block_t))](
        host, host_ids, heads, dst_loc, num_valid, k_buffer, v_buffer,
        host.stride(0), host.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        page_size, head_dim,
        BLOCK_T=block_t, BLOCK_D=next_power_of_2(head_dim),
    )  # fmt: skip


def backup_direct(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    src_loc: torch.Tensor,
    host_ids: torch.Tensor,
    valid: torch.Tensor,
    host: torch.Tensor,
    impl: str | None = None,
) -> None:
    """Write whole device pages into host blocks, every KV head.

    For every ``i`` with ``valid[i]``, head ``h`` and ``t < page_size``::

        host[host_ids[i], h, 0, t] = k_buffer[src_loc[i] + t, h]
        host[host_ids[i], h, 1, t] = v_buffer[src_loc[i] + t, h]

    Parameters
    ----------
    k_buffer, v_buffer : torch.Tensor
        shape ``[num_rows, num_kv_heads, head_dim]`` (NHD), same float dtype.
    src_loc, host_ids : torch.Tensor
        shape ``[n]``, int32/int64, on the KV device: first row of each page, its host page.
    valid : torch.Tensor
        shape ``[n]``, bool, on the KV device: entries to write (the others are skipped).
    host : torch.Tensor
        as in :func:`recall_direct` (written in place).

    Note
    ----
    No host sync on the Triton path; graph-capturable. A host reader must order itself after
    the kernel (stream or event) before reading the blocks.
    """
    _check_host(host, k_buffer)
    check_tensor("v_buffer", v_buffer, shape=tuple(k_buffer.shape), dtype=k_buffer.dtype,
                 last_dim_contiguous=True)
    n = src_loc.shape[0]
    check_tensor("src_loc", src_loc, shape=(n,), dtype=INDEX_DTYPES)
    check_tensor("host_ids", host_ids, shape=(n,), dtype=INDEX_DTYPES)
    check_tensor("valid", valid, shape=(n,), dtype=torch.bool)
    check_same_device("k_buffer", k_buffer, v_buffer=v_buffer, src_loc=src_loc,
                      host_ids=host_ids, valid=valid)
    check_positive_int("page_size", host.shape[3])
    if resolve_impl(impl, k_buffer) == "ref":
        ref_backup_direct(k_buffer, v_buffer, src_loc, host_ids, valid, host)
        return
    num_kv_heads, page_size, head_dim = k_buffer.shape[1], host.shape[3], host.shape[4]
    if n == 0 or num_kv_heads == 0:
        return
    _backup_direct_kernel[(n, num_kv_heads)](
        k_buffer, v_buffer, src_loc, host_ids, valid.view(torch.int8), host,
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        host.stride(0), host.stride(1), page_size, head_dim,
        BLOCK_T=min(next_power_of_2(page_size), 32), BLOCK_D=next_power_of_2(head_dim),
    )  # fmt: skip


def ref_recall_direct(
    host: torch.Tensor,
    host_ids: torch.Tensor,
    heads: torch.Tensor,
    dst_loc: torch.Tensor,
    num_valid: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
) -> None:
    """PyTorch reference of :func:`recall_direct` (reads ``num_valid``: syncs on CUDA)."""
    n = max(0, min(int(host_ids.shape[0]), int(num_valid[0])))
    page_size = host.shape[3]
    ids = host_ids[:n].long().to(host.device)
    hs = heads[:n].long().to(host.device)
    blocks = host[ids, hs].to(k_buffer.device)  # [n, 2, P, D]
    rows = dst_loc[:n].long()[:, None] + torch.arange(page_size, device=dst_loc.device)
    cols = heads[:n].long()[:, None].expand(n, page_size)
    k_buffer[rows, cols] = blocks[:, 0]
    v_buffer[rows, cols] = blocks[:, 1]


def ref_backup_direct(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    src_loc: torch.Tensor,
    host_ids: torch.Tensor,
    valid: torch.Tensor,
    host: torch.Tensor,
) -> None:
    """PyTorch reference of :func:`backup_direct` (selects ``valid`` entries: syncs on CUDA)."""
    keep = valid.to(torch.bool)
    loc, ids = src_loc[keep].long(), host_ids[keep].long()
    page_size = host.shape[3]
    rows = loc[:, None] + torch.arange(page_size, device=loc.device)  # [m, P]
    k = k_buffer[rows].transpose(1, 2)  # [m, H, P, D]
    v = v_buffer[rows].transpose(1, 2)
    host[ids.to(host.device)] = torch.stack([k, v], dim=2).to(host.device)  # [m, H, 2, P, D]
