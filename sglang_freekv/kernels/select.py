"""Page selection: Quest upper-bound scores, per-head softmax, GQA group mean, top-k.

freekv-method.md §1.3 (``avgSM`` in fp32, the policy the accuracy numbers used). For request
``b``, query head ``h`` of KV head ``g = h // group_size`` and candidate logical page ``j``
with host page ``p = page_table[b, j]``::

    s[b, h, j]     = sum_i max(q[b, h, i] * min[p, g, i], q[b, h, i] * max[p, g, i])
    score[b, g, j] = mean_{h in group g} softmax_{j in candidates}(scale * s[b, h, :])[j]

``scale`` is the softmax temperature (``FreeKVConfig.score_scale``; the serving path passes
the attention scale 1/sqrt(D) by default, the public reference uses 1.0). Without it the
softmax is sqrt(D) times sharper than attention, the group mean is dominated by one query
head, and the embedded model loses passkeys that exact attention finds.

Span continuation (``span_weight`` = w in [0, 1], ``FreeKVConfig.span_weight``): a candidate
page whose predecessor ``j - 1`` is also a candidate scores at least w times the
predecessor's score (not chained: the predecessor's own, unboosted score)::

    final[b, g, j] = max(score[b, g, j], w * score[b, g, j - 1])

A head that reads a span (a number, a name, a quoted line) reads it left to right; when the
span crosses a page boundary, the page it will read next is the successor of the page it
reads now, whose own Quest bound can be low (one matching key among 31 others), while the
speculative query of the previous step points at the predecessor. With w = 0.5 a successor
enters the top-k only behind a predecessor that scores more than twice the k-th page, i.e.
one that a head reads strongly (docs/design.md, "Copying a needle across a page boundary").
``w = 0`` is the plain FreeKV score (then the candidates of a row sum to 1).

Candidates are ``cand_start[b] <= j < cand_end[b]`` with ``page_table[b, j] >= 0``; every
other position scores ``-inf``.

* ``_raw_score_kernel`` — Triton, one program per (request, KV head, block of pages):
  the raw upper bounds of the group's query heads, into an fp32 scratch.
* ``_group_softmax_kernel`` — Triton, one program per (request, KV head): masked
  softmax per query head (online max/sum), then the group mean.
* :func:`score_pages`, :func:`select_pages` — launchers (top-k is ``torch.topk``).
* :func:`cpu_score_pages` — the serving path on CPU (``impl="cpu"``, the default for CPU
  tensors): the whole batch in ~15 tensor ops. With ``min <= max`` (true of every digest),
  ``max(q*min, q*max) = min(q, 0)*min + max(q, 0)*max``, so the bounds of all pages are one
  batched matmul instead of a ``[H, G, pages, D]`` temporary per request.
* :func:`ref_score_pages`, :func:`ref_select_pages` — the PyTorch reference (the spec).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    ScratchBuffers,
    check_positive_int,
    check_same_device,
    check_tensor,
    next_power_of_2,
    resolve_impl_cpu,
)

__all__ = ["score_pages", "select_pages", "cpu_score_pages", "ref_score_pages",
           "ref_select_pages"]


@triton.jit
def _raw_score_kernel(
    q_ptr,  # [bs, num_qo_heads, head_dim]
    dg_ptr,  # [num_host_pages, num_kv_heads, 2, head_dim]
    pt_ptr,  # [bs, max_pages] host page id per logical page
    cs_ptr,  # [bs]
    ce_ptr,  # [bs]
    hm_ptr,  # [bs, num_kv_heads] int8: score this (request, KV head) (if HAS_MASK)
    raw_ptr,  # [bs, num_qo_heads, max_pages] fp32 scratch, candidates only
    stride_qb,
    stride_qh,
    stride_dp,
    stride_dh,
    stride_dm,
    stride_pb,
    max_pages,
    head_dim,
    scale,
    GROUP_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    offs_j = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.load(cs_ptr + b).to(tl.int32)
    ce = tl.load(ce_ptr + b).to(tl.int32)
    if HAS_MASK:  # a masked-out head has no candidates: no digest is read for it
        ce = tl.where(tl.load(hm_ptr + b * tl.num_programs(1) + g) != 0, ce, cs)
    in_range = (offs_j >= cs) & (offs_j < ce) & (offs_j < max_pages)
    host = tl.load(pt_ptr + b.to(tl.int64) * stride_pb + offs_j, mask=in_range, other=-1)
    cand = in_range & (host >= 0)  # [BLOCK_P]
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    mask = cand[:, None] & mask_d[None, :]
    # One [BLOCK_P, BLOCK_D] tile of min and of max for KV head g; shared by the group.
    base = dg_ptr + host.to(tl.int64)[:, None] * stride_dp + g * stride_dh + offs_d[None, :]
    kmin = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    kmax = tl.load(base + stride_dm, mask=mask, other=0.0).to(tl.float32)
    num_qo_heads = tl.num_programs(1) * GROUP_SIZE
    for r in tl.static_range(GROUP_SIZE):
        h = g * GROUP_SIZE + r
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=mask_d,
                    other=0.0).to(tl.float32)  # [BLOCK_D]
        s = tl.sum(tl.maximum(q[None, :] * kmin, q[None, :] * kmax), axis=1) * scale
        raw = raw_ptr + (b.to(tl.int64) * num_qo_heads + h) * max_pages + offs_j
        tl.store(raw, s, mask=cand)


@triton.jit
def _group_softmax_kernel(
    raw_ptr,  # [bs, num_qo_heads, max_pages] fp32 (candidates written)
    pt_ptr,  # [bs, max_pages]
    cs_ptr,  # [bs]
    ce_ptr,  # [bs]
    hm_ptr,  # [bs, num_kv_heads] int8 (if HAS_MASK)
    out_ptr,  # [bs, num_kv_heads, max_pages] fp32
    stride_pb,
    max_pages,
    span_weight,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SPAN: tl.constexpr,  # span_weight > 0
    HAS_MASK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    cs = tl.load(cs_ptr + b).to(tl.int32)
    ce = tl.load(ce_ptr + b).to(tl.int32)
    if HAS_MASK:  # a masked-out head scores -inf everywhere (as with no candidates)
        ce = tl.where(tl.load(hm_ptr + b * num_kv_heads + g) != 0, ce, cs)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP_SIZE
    row = (b.to(tl.int64) * num_kv_heads * GROUP_SIZE + g * GROUP_SIZE + offs_g) * max_pages
    # Pass 1: online max and sum of exp per query head, over candidates only.
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for j0 in range(0, max_pages, BLOCK_P):
        offs_j = j0 + tl.arange(0, BLOCK_P)
        in_range = (offs_j >= cs) & (offs_j < ce) & (offs_j < max_pages)
        host = tl.load(pt_ptr + b.to(tl.int64) * stride_pb + offs_j, mask=in_range, other=-1)
        cand = in_range & (host >= 0)
        s = tl.load(raw_ptr + row[:, None] + offs_j[None, :],
                    mask=mask_g[:, None] & cand[None, :], other=float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv_l = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
    # Pass 2: probabilities, mean over the group, -inf outside the candidates.
    for j0 in range(0, max_pages, BLOCK_P):
        offs_j = j0 + tl.arange(0, BLOCK_P)
        in_range = (offs_j >= cs) & (offs_j < ce) & (offs_j < max_pages)
        host = tl.load(pt_ptr + b.to(tl.int64) * stride_pb + offs_j, mask=in_range, other=-1)
        cand = in_range & (host >= 0)
        s = tl.load(raw_ptr + row[:, None] + offs_j[None, :],
                    mask=mask_g[:, None] & cand[None, :], other=float("-inf"))
        p = tl.exp(s - m_safe[:, None]) * inv_l[:, None]  # [BLOCK_G, BLOCK_P]
        score = tl.sum(p, axis=0) / GROUP_SIZE
        if SPAN:  # the predecessor's (unboosted) score, recomputed from its raw bounds
            offs_q = offs_j - 1
            in_q = (offs_q >= cs) & (offs_q < ce) & (offs_q < max_pages) & (offs_q >= 0)
            host_q = tl.load(pt_ptr + b.to(tl.int64) * stride_pb + offs_q, mask=in_q,
                             other=-1)
            cand_q = in_q & (host_q >= 0)
            s_q = tl.load(raw_ptr + row[:, None] + offs_q[None, :],
                          mask=mask_g[:, None] & cand_q[None, :], other=float("-inf"))
            p_q = tl.exp(s_q - m_safe[:, None]) * inv_l[:, None]
            score_q = tl.sum(p_q, axis=0) / GROUP_SIZE
            score = tl.where(cand_q, tl.maximum(score, span_weight * score_q), score)
        score = tl.where(cand, score, float("-inf"))
        out = out_ptr + (b.to(tl.int64) * num_kv_heads + g) * max_pages + offs_j
        tl.store(out, score, mask=offs_j < max_pages)


def _check_args(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    num_kv_heads: int,
) -> None:
    check_tensor("q", q, shape=(None, None, None), dtype=FLOAT_DTYPES, last_dim_contiguous=True)
    bs, num_qo_heads, head_dim = q.shape
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_qo_heads % num_kv_heads:
        raise ValueError(
            f"Invalid value of num_kv_heads: num_qo_heads ({num_qo_heads}) must be a multiple "
            f"of num_kv_heads ({num_kv_heads})"
        )
    check_tensor("digests", digests, shape=(None, num_kv_heads, 2, head_dim),
                 dtype=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("page_table", page_table, shape=(bs, None), dtype=INDEX_DTYPES,
                 last_dim_contiguous=True)
    check_tensor("cand_start", cand_start, shape=(bs,), dtype=INDEX_DTYPES)
    check_tensor("cand_end", cand_end, shape=(bs,), dtype=INDEX_DTYPES)
    check_same_device("q", q, digests=digests, page_table=page_table, cand_start=cand_start,
                      cand_end=cand_end)


def _check_score_args(q: torch.Tensor, digests: torch.Tensor, page_table: torch.Tensor,
                      cand_start: torch.Tensor, cand_end: torch.Tensor, num_kv_heads: int,
                      scale: float, span_weight: float) -> None:
    """Every check of a scoring entry point (tensors, scale, span weight)."""
    _check_args(q, digests, page_table, cand_start, cand_end, num_kv_heads)
    _check_scale(scale)
    _check_span_weight(span_weight)


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1e30:
        raise ValueError(f"Invalid value of scale: {scale!r} (must be a finite number > 0)")


def _check_span_weight(span_weight: float) -> None:
    w = span_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
        raise ValueError(f"Invalid value of span_weight: {w!r} (must be a number in [0, 1])")


def _span_boost(scores: torch.Tensor, span_weight: float) -> torch.Tensor:
    """``max(score[j], w * score[j - 1])`` on candidates (finite entries) of ``scores``
    ``[..., n]`` fp32 (-inf outside the candidates); in place, returned."""
    if span_weight <= 0.0 or scores.shape[-1] < 2:
        return scores
    prev = scores[..., :-1] * span_weight  # [..., n - 1]; -inf stays -inf (w > 0)
    cur = scores[..., 1:]
    cur.copy_(torch.where(torch.isinf(cur), cur, torch.maximum(cur, prev)))
    return scores


def score_pages(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    num_kv_heads: int,
    impl: str | None = None,
    scale: float = 1.0,
    span_weight: float = 0.0,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-consistent page scores (fp32) for every logical page of every request.

    Parameters
    ----------
    q : torch.Tensor
        shape ``[bs, num_qo_heads, head_dim]``, model dtype (fp32/fp16/bf16), post-RoPE;
        stride 1 in ``head_dim``.
    digests : torch.Tensor
        shape ``[num_host_pages, num_kv_heads, 2, head_dim]``, float, same device: one
        layer's digests indexed by host page id; ``[..., 0, :]`` min, ``[..., 1, :]`` max.
    page_table : torch.Tensor
        shape ``[bs, max_pages]``, int32 (int64 accepted): host page id of each logical
        page, ``-1`` where none (such a page is never a candidate).
    cand_start, cand_end : torch.Tensor
        shape ``[bs]``, int32 (int64 accepted): candidates are logical pages
        ``[cand_start[b], cand_end[b])`` (may be empty; clipped to ``[0, max_pages)``).
    num_kv_heads : int
        ``H``; ``num_qo_heads`` must be a multiple (``group_size = num_qo_heads // H``).
    impl : str, optional
        ``"triton"`` | ``"cpu"`` | ``"ref"``; default ``"triton"`` where Triton runs (see
        ``_common.use_triton``), else ``"cpu"`` (:func:`cpu_score_pages`).
    scale : float
        softmax temperature (> 0) applied to the raw bounds (see the module docstring).
    span_weight : float
        in ``[0, 1]``: a candidate scores at least ``span_weight`` times its candidate
        predecessor (span continuation, see the module docstring); 0 = off.
    head_mask : torch.Tensor, optional
        shape ``[bs, num_kv_heads]``, bool, same device: only these (request, KV head) pairs
        are scored; the others score ``-inf`` everywhere (the Triton kernels skip their
        work: a correction that flags few heads costs little). Default: all.

    Returns
    -------
    torch.Tensor
        shape ``[bs, num_kv_heads, max_pages]``, fp32, same device; position ``j`` is
        logical page ``j``; ``-inf`` outside the candidates. With ``span_weight == 0`` the
        candidates of one (request, KV head) sum to 1 (when there are any).

    Note
    ----
    No host sync on the Triton path; graph-capturable on CUDA.
    """
    _check_score_args(q, digests, page_table, cand_start, cand_end, num_kv_heads, scale,
                      span_weight)
    if head_mask is not None:
        check_tensor("head_mask", head_mask, shape=(q.shape[0], num_kv_heads), dtype=torch.bool)
        check_same_device("q", q, head_mask=head_mask)
    path = resolve_impl_cpu(impl, q)
    if path in ("cpu", "ref"):
        fn = cpu_score_pages if path == "cpu" else ref_score_pages
        out = fn(q, digests, page_table, cand_start, cand_end, num_kv_heads, scale, span_weight)
        if head_mask is not None:
            out.masked_fill_(~head_mask[:, :, None], float("-inf"))
        return out
    bs, num_qo_heads, head_dim = q.shape
    max_pages = page_table.shape[1]
    group_size = num_qo_heads // num_kv_heads
    out = torch.empty((bs, num_kv_heads, max_pages), dtype=torch.float32, device=q.device)
    if bs == 0 or max_pages == 0:
        return out
    raw = torch.empty((bs, num_qo_heads, max_pages), dtype=torch.float32, device=q.device)
    block_d = next_power_of_2(head_dim)
    # ~4K fp32 elements per digest tile (32 pages at head_dim 128): two tiles stay in
    # registers at 4 warps, and a 128K-token request still spreads over 128 programs.
    block_p = max(1, min(next_power_of_2(max_pages), 4096 // block_d, 64))
    grid = (bs, num_kv_heads, triton.cdiv(max_pages, block_p))
    # [bs, H] int8 (dummy pointer when unused)
    hm = head_mask.contiguous().view(torch.int8) if head_mask is not None else cand_start
    _raw_score_kernel[grid](
        q, digests, page_table, cand_start, cand_end, hm, raw,
        q.stride(0), q.stride(1),
        digests.stride(0), digests.stride(1), digests.stride(2),
        page_table.stride(0),
        max_pages, head_dim, float(scale),
        GROUP_SIZE=group_size, BLOCK_P=block_p, BLOCK_D=block_d,
        HAS_MASK=head_mask is not None,
    )  # fmt: skip
    block_g = next_power_of_2(group_size)
    _group_softmax_kernel[(bs, num_kv_heads)](
        raw, page_table, cand_start, cand_end, hm, out,
        page_table.stride(0), max_pages, float(span_weight),
        GROUP_SIZE=group_size, BLOCK_G=block_g,
        BLOCK_P=max(16, min(next_power_of_2(max_pages), 4096 // block_g, 1024)),
        SPAN=span_weight > 0, HAS_MASK=head_mask is not None,
    )  # fmt: skip
    return out


# Pages per GEMM of cpu_score_pages (a multiple of 16 lanes): the same shape for every batch.
_CHUNK = 16
# cpu_score_pages' digest gather and GEMM operands (MBs for a step job): reused, not refaulted.
_SCRATCH = ScratchBuffers()


class CpuScoreWindow:
    """Plan of :func:`cpu_score_pages` for one batch's candidates: the window of logical
    pages ``[a, a + n * _CHUNK)`` that holds every candidate, the host page rows it gathers
    and the candidate mask. It depends on the page table and the ranges only, so one decode
    step builds it once and scores every layer with it (:func:`cpu_window_scores`).

    Fields: ``bs``, ``max_pages``; ``a``, ``n`` (chunks; ``n == 0``: no candidate);
    ``rows [bs * w] int64`` host page ids of the window (0 where none); ``keep [bs, w]``
    bool, candidates.
    """

    __slots__ = ("bs", "max_pages", "a", "n", "rows", "keep")

    def __init__(self, bs: int, max_pages: int, a: int, n: int, rows: torch.Tensor,
                 keep: torch.Tensor) -> None:
        self.bs, self.max_pages, self.a, self.n, self.rows, self.keep = (
            bs, max_pages, a, n, rows, keep)

    @property
    def width(self) -> int:
        return self.n * _CHUNK

    def take(self, idx: torch.Tensor) -> CpuScoreWindow:
        """The window of batch positions ``idx`` (``[b']`` int64): the same pages and
        chunks (so the same scores: batch invariance), those rows only."""
        if self.n == 0:
            return CpuScoreWindow(int(idx.numel()), self.max_pages, 0, 0, self.rows,
                                  self.keep.index_select(0, idx))
        rows = self.rows.view(self.bs, -1).index_select(0, idx).reshape(-1)
        return CpuScoreWindow(int(idx.numel()), self.max_pages, self.a, self.n, rows,
                              self.keep.index_select(0, idx))


def plan_cpu_window(page_table: torch.Tensor, cand_start: torch.Tensor,
                    cand_end: torch.Tensor) -> CpuScoreWindow:
    """The :class:`CpuScoreWindow` of ``page_table [bs, max_pages]`` int32/int64 and the
    ranges ``cand_start``/``cand_end [bs]`` int32/int64 (same device, unchecked: callers
    validate). One host read of the ranges (free on CPU, a sync on CUDA)."""
    bs, max_pages = page_table.shape
    dev = page_table.device
    empty = CpuScoreWindow(bs, max_pages, 0, 0, page_table.new_zeros(0, dtype=torch.int64),
                           torch.zeros((bs, 0), dtype=torch.bool, device=dev))
    if bs == 0 or max_pages == 0:
        return empty
    # SYNC (free on CPU): the ranges as Python ints, clipped to [0, max_pages).
    lo = [min(max(x, 0), max_pages) for x in cand_start.tolist()]
    hi = [max(min(x, max_pages), a) for x, a in zip(cand_end.tolist(), lo)]
    a, b = min(lo), max(hi)
    if b <= a:
        return empty
    # Batch invariance: the window [a, b) depends on the batch, and a GEMM's rows change in
    # their last bits with its width (MKL picks its blocking by shape), which can flip a
    # near-tie of the top-k. So the window is cut into chunks of _CHUNK pages aligned to page
    # 0, each one small GEMM of the same shape: a page's score is the same alone or in any
    # batch (docs/design.md "Batch invariance").
    a = a - a % _CHUNK
    n = -(-(b - a) // _CHUNK)  # chunks
    w = n * _CHUNK
    pt = page_table[:, a:a + w]  # [bs, <= w] host page ids of the window
    if pt.shape[1] < w:  # past the table's end: no page
        pt = torch.cat([pt, pt.new_full((bs, w - pt.shape[1]), -1)], dim=1)
    keep = pt >= 0  # [bs, w]
    j = torch.arange(a, a + w, device=dev)
    lo_t = torch.tensor(lo, device=dev)[:, None]
    hi_t = torch.tensor(hi, device=dev)[:, None]
    keep &= (j >= lo_t) & (j < hi_t)
    return CpuScoreWindow(bs, max_pages, a, n, pt.reshape(-1).clamp(min=0).to(torch.int64),
                          keep)


def cpu_window_scores(
    win: CpuScoreWindow,
    q: torch.Tensor,
    digests: torch.Tensor,
    num_kv_heads: int,
    scale: float,
    span_weight: float,
) -> torch.Tensor:
    """Scores of the pages of ``win`` (unchecked: callers validate): ``q [bs, Hq, D]``,
    ``digests [num_host_pages, H, 2, D]`` as in :func:`score_pages`. Returns ``[bs, H, w]``
    fp32 (a new tensor), position ``i`` = logical page ``win.a + i``, ``-inf`` off the
    candidates."""
    bs, num_qo_heads, head_dim = q.shape
    h, g = num_kv_heads, num_qo_heads // num_kv_heads
    n, w, dev = win.n, win.width, q.device
    raw = _SCRATCH.get("digests", (bs * w, h, 2, head_dim), digests.dtype, dev)
    torch.index_select(digests, 0, win.rows, out=raw)  # (min, max) rows
    # fp32 and head-major in one copy: [bs, H, n, C, 2D]
    dg = _SCRATCH.get("digests_f32", (bs, h, n, _CHUNK, 2 * head_dim), torch.float32, dev)
    dg.copy_(raw.view(bs, n, _CHUNK, h, 2 * head_dim).permute(0, 3, 1, 2, 4))
    qf = q.float().view(bs, h, g, head_dim) * scale  # [bs, H, G, D]
    q2 = torch.cat([qf.clamp(max=0.0), qf.clamp(min=0.0)], dim=-1)  # [bs, H, G, 2D]
    # [bs, H, 1, G, 2D] @ [bs, H, n, 2D, C] -> [bs, H, n, G, C]: scaled Quest bounds
    s = _SCRATCH.get("bounds", (bs, h, n, g, _CHUNK), torch.float32, dev)
    torch.matmul(q2[:, :, None].expand(bs, h, n, g, 2 * head_dim), dg.transpose(-1, -2), out=s)
    s = s.permute(0, 1, 3, 2, 4).reshape(bs, h, g, w)  # [bs, H, G, w] (a copy)
    drop = ~win.keep[:, None, :]  # [bs, 1, w]
    s.masked_fill_(drop[:, :, None], float("-inf"))
    probs = torch.softmax(s, dim=-1).mean(dim=2)  # [bs, H, w]; NaN where no candidate
    probs.masked_fill_(drop, float("-inf"))
    # span continuation over the window (page a - 1 is nobody's candidate)
    return _span_boost(probs, span_weight)


def cpu_select_window(
    win: CpuScoreWindow,
    q: torch.Tensor,
    digests: torch.Tensor,
    num_kv_heads: int,
    top_k: int,
    scale: float,
    span_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_pages` on CPU with a planned window (unchecked: callers validate; a
    decode step plans once and selects every layer's corrections with it)."""
    if win.n == 0:
        shape = (win.bs, num_kv_heads, top_k)
        return (torch.full(shape, -1, dtype=torch.int32, device=q.device),
                torch.full(shape, float("-inf"), device=q.device))
    scores = cpu_window_scores(win, q, digests, num_kv_heads, scale, span_weight)
    return _top_k(scores, top_k, offset=win.a)  # window position i = logical page a + i


def cpu_score_pages(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    num_kv_heads: int,
    scale: float = 1.0,
    span_weight: float = 0.0,
) -> torch.Tensor:
    """:func:`score_pages` as batched PyTorch ops (the CPU serving path; any device works).

    Same arguments and result. Assumes ``min <= max`` in every digest (``page_digest``
    guarantees it): the Quest bound is then ``min(q, 0) . min + max(q, 0) . max``, one
    matmul over the candidate window ``[min cand_start, max cand_end)`` of the batch
    (:func:`plan_cpu_window`, then :func:`cpu_window_scores`).
    One host read of that window (free on CPU, a sync on CUDA).
    """
    _check_score_args(q, digests, page_table, cand_start, cand_end, num_kv_heads, scale,
                      span_weight)
    bs = q.shape[0]
    max_pages = page_table.shape[1]
    out = torch.full((bs, num_kv_heads, max_pages), float("-inf"), device=q.device)
    win = plan_cpu_window(page_table, cand_start, cand_end)
    if win.n == 0:
        return out
    probs = cpu_window_scores(win, q, digests, num_kv_heads, scale, span_weight)
    a = win.a
    end = min(a + win.width, max_pages)
    out[:, :, a:end] = probs[:, :, :end - a]
    return out


def _top_k(scores: torch.Tensor, top_k: int, offset: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim of ``scores`` [bs, H, max_pages]; ``-inf`` entries -> -1;
    ``offset`` is added to the page of every other entry (scores of a window of pages)."""
    bs, num_kv_heads, max_pages = scores.shape
    k = min(top_k, max_pages)
    vals, idx = torch.topk(scores, k, dim=-1)  # [bs, H, k] fp32, int64 (sorted, descending)
    idx = torch.where(vals == float("-inf"), -1, idx + offset).to(torch.int32)  # [bs, H, k]
    if k < top_k:
        pad = (bs, num_kv_heads, top_k - k)
        vals = torch.cat([vals, vals.new_full(pad, float("-inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_full(pad, -1)], dim=-1)
    return idx.contiguous(), vals.contiguous()


def select_pages(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    num_kv_heads: int,
    top_k: int,
    impl: str | None = None,
    scale: float = 1.0,
    span_weight: float = 0.0,
    head_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` logical pages per (request, KV head) by :func:`score_pages`.

    Arguments as in :func:`score_pages` (``impl``, ``scale``, ``span_weight`` and
    ``head_mask`` included: masked-out heads get ``-1`` pages), plus ``top_k`` (int >= 1).

    Returns
    -------
    page_indices : torch.Tensor
        shape ``[bs, num_kv_heads, top_k]``, int32: logical page ids, best first; ``-1``
        where the request has fewer than ``top_k`` candidates. Among tied scores the
        choice is unspecified.
    page_scores : torch.Tensor
        shape ``[bs, num_kv_heads, top_k]``, fp32: their scores, ``-inf`` where ``-1``.

    Note
    ----
    No host sync on the Triton path (``torch.topk`` stays on the device).
    """
    check_positive_int("top_k", top_k)
    if head_mask is None and resolve_impl_cpu(impl, q) == "cpu":
        # CPU serving path: top-k over the candidate window only (same result)
        _check_score_args(q, digests, page_table, cand_start, cand_end, num_kv_heads,
                          scale, span_weight)
        win = plan_cpu_window(page_table, cand_start, cand_end)
        return cpu_select_window(win, q, digests, num_kv_heads, top_k, scale, span_weight)
    scores = score_pages(q, digests, page_table, cand_start, cand_end, num_kv_heads, impl=impl,
                         scale=scale, span_weight=span_weight, head_mask=head_mask)
    return _top_k(scores, top_k)


def ref_score_pages(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    num_kv_heads: int,
    scale: float = 1.0,
    span_weight: float = 0.0,
) -> torch.Tensor:
    """PyTorch reference of :func:`score_pages` (loops over requests; syncs on CUDA)."""
    _check_score_args(q, digests, page_table, cand_start, cand_end, num_kv_heads, scale,
                      span_weight)
    bs, num_qo_heads, head_dim = q.shape
    max_pages = page_table.shape[1]
    group_size = num_qo_heads // num_kv_heads
    out = torch.full((bs, num_kv_heads, max_pages), float("-inf"), device=q.device)
    for b in range(bs):
        lo = max(int(cand_start[b]), 0)
        hi = min(int(cand_end[b]), max_pages)
        pages = torch.arange(lo, max(lo, hi), device=q.device)  # [n_c] logical pages
        host = page_table[b, pages].long()  # [n_c]
        pages, host = pages[host >= 0], host[host >= 0]
        if pages.numel() == 0:
            continue
        dg = digests[host].float()  # [n_c, H, 2, head_dim]
        kmin = dg[:, :, 0].transpose(0, 1)[:, None]  # [H, 1, n_c, head_dim]
        kmax = dg[:, :, 1].transpose(0, 1)[:, None]  # [H, 1, n_c, head_dim]
        qb = q[b].float().reshape(num_kv_heads, group_size, 1, head_dim)  # [H, G, 1, head_dim]
        s = torch.maximum(qb * kmin, qb * kmax).sum(-1)  # [H, G, n_c] Quest upper bound
        probs = torch.softmax(s * scale, dim=-1)  # [H, G, n_c] per query head, over candidates
        out[b, :, pages] = probs.mean(dim=1)  # [H, n_c] group mean
        if span_weight > 0:  # span continuation: page j inherits w * score of page j - 1
            row = out[b].clone()  # [H, max_pages] unboosted
            for j in pages.tolist():
                if j - 1 >= 0 and torch.isfinite(row[:, j - 1]).all():
                    out[b, :, j] = torch.maximum(row[:, j], span_weight * row[:, j - 1])
    return out


def ref_select_pages(
    q: torch.Tensor,
    digests: torch.Tensor,
    page_table: torch.Tensor,
    cand_start: torch.Tensor,
    cand_end: torch.Tensor,
    num_kv_heads: int,
    top_k: int,
    scale: float = 1.0,
    span_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`select_pages`."""
    check_positive_int("top_k", top_k)
    scores = ref_score_pages(q, digests, page_table, cand_start, cand_end, num_kv_heads, scale,
                             span_weight)
    return _top_k(scores, top_k)
