"""Decode attention over FreeKV's budget rows on GPUs: SGLang's Triton decode kernel.

The plan of a decode step already holds what SGLang's Triton backend feeds its kernel: a
ragged list of device rows per request (``kv_indptr`` int32 ``[bs + 1]``, ``kv_indices``
int64) into the layer's NHD ``k_buffer`` / ``v_buffer``; page size 1. The kernel splits each
request's rows into at most ``MAX_KV_SPLITS`` chunks (two passes: partial softmax per split,
then the reduction), so no per-request Python loop and no host sync.

Used by the ``freekv`` backend when the KV lives on a CUDA device; the CPU path stays torch
SDPA. ``tests/test_freekv_decode.py`` compares the two on CPU under ``TRITON_INTERPRET=1``.
FlashInfer's paged decode is not wired (it needs a host-side plan per step; see README).
"""

from __future__ import annotations

import torch

__all__ = ["MAX_KV_SPLITS", "triton_decode"]

MAX_KV_SPLITS = 8
_SPLIT_ROWS = 256  # rows per split before another split is used


def triton_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of one decode token per request over its budget rows.

    Parameters
    ----------
    q : ``[bs, Hq, D]`` model dtype, contiguous (post-RoPE query).
    k_buffer, v_buffer : ``[rows, H, D]`` model dtype (one layer, NHD).
    kv_indptr : ``[bs + 1]`` int32; ``kv_indices`` : ``[kv_indptr[-1]]`` int64 device rows
        (every request has at least one row).
    kv_lens : ``[bs]`` int32, ``kv_indptr`` differences (chooses the number of splits).
    scaling : softmax scale of the layer.

    Returns ``[bs, Hq, D]`` in ``q``'s dtype.
    """
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    bs, hq, d = q.shape
    if k_buffer.dim() != 3 or k_buffer.shape[-1] != d or v_buffer.shape[:2] != k_buffer.shape[:2]:
        raise ValueError(f"Invalid shape of k_buffer/v_buffer: {tuple(k_buffer.shape)} / "
                         f"{tuple(v_buffer.shape)} for q {tuple(q.shape)}")
    dv = v_buffer.shape[-1]
    o = torch.empty((bs, hq, dv), dtype=q.dtype, device=q.device)
    logits = torch.empty((bs, hq, MAX_KV_SPLITS, dv), dtype=torch.float32, device=q.device)
    lse = torch.empty((bs, hq, MAX_KV_SPLITS), dtype=torch.float32, device=q.device)
    splits = ((kv_lens.to(torch.int32) + _SPLIT_ROWS - 1) // _SPLIT_ROWS).clamp_(1, MAX_KV_SPLITS)
    decode_attention_fwd(
        q.contiguous(), k_buffer, v_buffer, o, kv_indptr.to(torch.int32), kv_indices,
        logits, lse, splits.to(torch.int32), MAX_KV_SPLITS, scaling, 1.0, 1.0,
    )
    return o
