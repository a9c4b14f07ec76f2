"""Decode attention over row lists in torch: the reference and the CPU serving path.

``ref_decode_attention``: one gather of all rows into a padded ``[bs, max_len, H, D]`` tensor,
fp32 scores with a masked softmax, GQA by viewing ``q`` as ``[bs, H, group_size, D]``. The
same function with the same row order gives bit-identical results, which the budget >=
context test relies on.

``sdpa_decode``: the CPU serving path over the budget rows. It feeds torch's
``scaled_dot_product_attention`` exactly what SGLang's torch_native decode feeds it (per
request, ``[H, n, D]`` views of ``[n, H, D]`` gathers), so outputs are bit-identical to it,
but gathers the rows with ``gather_rows``: an ``index_select`` of whole rows viewed as
int64, several times faster on CPU than advanced indexing of float rows.
"""

from __future__ import annotations

import torch

from sglang_freekv.kernels._common import wide_int_view

__all__ = ["gather_rows", "ref_decode_attention", "sdpa_decode"]


def ref_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention of one layer over ragged row lists.

    Parameters
    ----------
    q : ``[bs, Hq, D]`` model dtype.
    k_buffer, v_buffer : ``[rows, H, D]`` model dtype, same device (NHD).
    kv_indptr : ``[bs + 1]`` int32/int64, same device.
    kv_indices : ``[kv_indptr[-1]]`` int64 rows, same device.
    scale : softmax scale (usually ``D ** -0.5``).

    Returns ``[bs, Hq, D]`` in ``q.dtype``. Note: one host sync (max length).
    """
    bs, hq, d = q.shape
    h = k_buffer.shape[1]
    gs = hq // h
    indptr = kv_indptr.to(torch.int64)
    lens = indptr[1:] - indptr[:-1]  # [bs]
    max_len = int(lens.max()) if bs else 0
    if max_len == 0:
        return torch.zeros_like(q)
    pos = torch.arange(max_len, device=q.device)
    mask = pos[None, :] < lens[:, None]  # [bs, max_len]
    idx = torch.where(mask, indptr[:-1, None] + pos[None, :], torch.zeros_like(mask, dtype=torch.int64))
    rows = kv_indices[idx]  # [bs, max_len] int64
    k = k_buffer[rows].float()  # [bs, max_len, H, D]
    v = v_buffer[rows].float()
    qf = q.float().view(bs, h, gs, d)
    s = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale  # [bs, H, gs, max_len] fp32
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgl,blhd->bhgd", p, v)  # [bs, H, gs, D]
    return o.reshape(bs, hq, d).to(q.dtype)


def gather_rows(buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``buf[rows]`` for a contiguous ``buf`` ``[N, ...]`` and ``rows`` ``[n]`` int64 (same
    device): a new contiguous ``[n, ...]`` tensor, gathered as whole rows of the widest integer
    type dividing a row (``wide_int_view``; bit-identical, any dtype)."""
    if not buf.is_contiguous() or buf.dim() == 0:
        return buf[rows]
    flat = buf.view(buf.shape[0], -1)  # [N, row elements]
    wide = wide_int_view(flat).index_select(0, rows)  # [n, row bytes / itemsize]
    return wide.view(buf.dtype).view(rows.shape[0], *buf.shape[1:])


def sdpa_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    table: torch.Tensor,
    kv_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Decode attention of one layer, one ``scaled_dot_product_attention`` per request.

    Parameters
    ----------
    q : ``[bs, Hq, D]`` model dtype.
    k_buffer, v_buffer : ``[rows, H, D]`` (``H`` divides ``Hq``), same device (NHD).
    table : ``[bs, >= max(kv_lens)]`` int64 device rows per request (padding ignored).
    kv_lens : ``bs`` host ints, rows attended per request (``>= 1``).
    scale : softmax scale.

    Returns ``[bs, Hq, D]`` in ``q.dtype``.
    """
    from torch.nn.functional import scaled_dot_product_attention

    bs, hq, d = q.shape
    gqa = hq != k_buffer.shape[1]
    out = torch.empty_like(q)
    qh = q.movedim(0, 1)  # [Hq, bs, D]
    for b, n in enumerate(kv_lens):
        rows = table[b, :n]
        k = gather_rows(k_buffer, rows).movedim(0, 1)  # [H, n, D]
        v = gather_rows(v_buffer, rows).movedim(0, 1)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        o = scaled_dot_product_attention(qh[:, b:b + 1].unsqueeze(0), k.unsqueeze(0),
                                         v.unsqueeze(0), enable_gqa=gqa, scale=scale)
        out[b] = o[0, :, 0]  # [Hq, D]
    return out
