"""Correction flags: group-mean cosine similarity of consecutive queries per KV head.

freekv-method.md §3: for request ``b`` and KV head ``g``::

    sim[b, g]   = mean_{h in group g} cos(q[b, h], last_q[b, h])     (fp32; cos = 0 if a
                                                                      vector is zero)
    flags[b, g] = sim[b, g] < tau

A flagged (request, KV head) gets a synchronous selection + recall with ``q_t`` before
attention; the others reuse the speculative result selected with ``q_{t-1}``.

* ``_correction_kernel`` — Triton, one program per (request, KV head).
* :func:`correction_flags` — launcher. :func:`ref_correction_flags` — reference (the spec).
* :func:`cpu_correction_flags` — the CPU serving path (``impl="cpu"``, the default for CPU
  tensors): ATen's fused ``cosine_similarity`` (vectors normalised before the dot, norms
  clamped at 1e-12, so a zero vector also gives 0), then the group mean: 4 ops, not 17.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    check_positive_int,
    check_same_device,
    check_tensor,
    next_power_of_2,
    resolve_impl_cpu,
)

__all__ = ["correction_flags", "cpu_correction_flags", "ref_correction_flags"]


@triton.jit
def _correction_kernel(
    q_ptr,  # [bs, num_qo_heads, head_dim]
    lq_ptr,  # [bs, num_qo_heads, head_dim]
    flags_ptr,  # [bs, num_kv_heads] uint8 view of bool
    sim_ptr,  # [bs, num_kv_heads] fp32
    stride_qb,
    stride_qh,
    stride_lb,
    stride_lh,
    head_dim,
    tau,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_g < GROUP_SIZE)[:, None] & (offs_d < head_dim)[None, :]
    h = g * GROUP_SIZE + offs_g  # [BLOCK_G] query heads of KV head g
    x = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    y = tl.load(lq_ptr + b.to(tl.int64) * stride_lb + h[:, None] * stride_lh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    dot = tl.sum(x * y, axis=1)
    denom = tl.sqrt(tl.sum(x * x, axis=1)) * tl.sqrt(tl.sum(y * y, axis=1))
    cos = tl.where(denom > 0.0, dot / tl.where(denom > 0.0, denom, 1.0), 0.0)  # [BLOCK_G]
    sim = tl.sum(cos, axis=0) / GROUP_SIZE  # padded heads contribute 0
    off = b.to(tl.int64) * num_kv_heads + g
    tl.store(sim_ptr + off, sim)
    tl.store(flags_ptr + off, (sim < tau).to(tl.uint8))


def _check_args(q: torch.Tensor, last_q: torch.Tensor, num_kv_heads: int, tau: float) -> None:
    check_tensor("q", q, shape=(None, None, None), dtype=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("last_q", last_q, shape=tuple(q.shape), dtype=FLOAT_DTYPES,
                 last_dim_contiguous=True)
    check_same_device("q", q, last_q=last_q)
    check_positive_int("num_kv_heads", num_kv_heads)
    if q.shape[1] % num_kv_heads:
        raise ValueError(
            f"Invalid value of num_kv_heads: num_qo_heads ({q.shape[1]}) must be a multiple "
            f"of num_kv_heads ({num_kv_heads})"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"Invalid value of tau: expected a float, got {tau!r}")


def correction_flags(
    q: torch.Tensor,
    last_q: torch.Tensor,
    num_kv_heads: int,
    tau: float,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (request, KV head) pairs need a correction recall this step.

    Parameters
    ----------
    q : torch.Tensor
        shape ``[bs, num_qo_heads, head_dim]``, model dtype (fp32/fp16/bf16), post-RoPE
        query of this step; stride 1 in ``head_dim``.
    last_q : torch.Tensor
        shape ``[bs, num_qo_heads, head_dim]``, float, same device: the previous step's query.
    num_kv_heads : int
        ``H``; ``num_qo_heads`` must be a multiple (GQA: query head ``h`` -> KV head
        ``h // group_size``).
    tau : float
        threshold; a pair is flagged when its similarity is strictly below ``tau``.
    impl : str, optional
        ``"triton"`` | ``"cpu"`` | ``"ref"``; default ``"triton"`` where Triton runs, else
        ``"cpu"`` (:func:`cpu_correction_flags`).

    Returns
    -------
    flags : torch.Tensor
        shape ``[bs, num_kv_heads]``, bool: ``sim < tau``.
    sim : torch.Tensor
        shape ``[bs, num_kv_heads]``, fp32: group mean of the per-query-head cosines.

    Note
    ----
    No host sync on the Triton path; graph-capturable on CUDA (``tau`` is a launch arg).
    """
    _check_args(q, last_q, num_kv_heads, tau)
    path = resolve_impl_cpu(impl, q)
    if path == "cpu":
        return cpu_correction_flags(q, last_q, num_kv_heads, tau)
    if path == "ref":
        return ref_correction_flags(q, last_q, num_kv_heads, tau)
    bs, num_qo_heads, head_dim = q.shape
    group_size = num_qo_heads // num_kv_heads
    flags = torch.empty((bs, num_kv_heads), dtype=torch.bool, device=q.device)
    sim = torch.empty((bs, num_kv_heads), dtype=torch.float32, device=q.device)
    if bs == 0:
        return flags, sim
    _correction_kernel[(bs, num_kv_heads)](
        q, last_q, flags.view(torch.uint8), sim,
        q.stride(0), q.stride(1), last_q.stride(0), last_q.stride(1),
        head_dim, float(tau),
        GROUP_SIZE=group_size,
        BLOCK_G=next_power_of_2(group_size),
        BLOCK_D=next_power_of_2(head_dim),
    )  # fmt: skip
    return flags, sim


def cpu_correction_flags(
    q: torch.Tensor,
    last_q: torch.Tensor,
    num_kv_heads: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correction_flags` as one fused ATen op (the CPU serving path; any device).
    Same arguments and results up to fp32 rounding of ``sim``."""
    _check_args(q, last_q, num_kv_heads, tau)
    bs, num_qo_heads, _ = q.shape
    cos = torch.nn.functional.cosine_similarity(q.float(), last_q.float(), dim=-1, eps=1e-12)
    sim = cos.view(bs, num_kv_heads, num_qo_heads // num_kv_heads).mean(-1)  # [bs, H] fp32
    return sim < tau, sim


def cpu_drift_flags(
    q: torch.Tensor,
    last_q: torch.Tensor,
    num_kv_heads: int,
    tau: float,
) -> list[list[bool]]:
    """The ``[bs][H]`` flags of :func:`cpu_correction_flags` as Python lists, without its
    argument checks: the CPU engine's per-layer hot path (every sparse layer of every step),
    whose caller passes tensors it built itself. Same computation, same flags."""
    bs, num_qo_heads, _ = q.shape
    cos = torch.nn.functional.cosine_similarity(q.float(), last_q.float(), dim=-1, eps=1e-12)
    sim = cos.view(bs, num_kv_heads, num_qo_heads // num_kv_heads).mean(-1)  # [bs, H] fp32
    return (sim < tau).tolist()


def ref_correction_flags(
    q: torch.Tensor,
    last_q: torch.Tensor,
    num_kv_heads: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`correction_flags` (same arguments and results)."""
    _check_args(q, last_q, num_kv_heads, tau)
    bs, num_qo_heads, head_dim = q.shape
    x = q.float()  # [bs, num_qo_heads, head_dim] fp32
    y = last_q.float()
    dot = (x * y).sum(-1)  # [bs, num_qo_heads]
    denom = x.square().sum(-1).sqrt() * y.square().sum(-1).sqrt()  # [bs, num_qo_heads]
    cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0)
    sim = cos.view(bs, num_kv_heads, num_qo_heads // num_kv_heads).mean(-1)  # [bs, H] fp32
    return sim < tau, sim
