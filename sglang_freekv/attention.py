"""ref_decode_attention: batched paged decode attention in torch (reference + CPU serving).

One gather of all rows into a padded ``[bs, max_len, H, D]`` tensor, fp32 scores with a
masked softmax, GQA by viewing ``q`` as ``[bs, H, group_size, D]``. The same function with
the same row order gives bit-identical results, which the budget >= context test relies on.
"""

from __future__ import annotations

import torch

__all__ = ["ref_decode_attention"]


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
