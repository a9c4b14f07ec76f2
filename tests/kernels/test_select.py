"""score_pages / select_pages: Triton kernels vs references vs a scalar statement of the spec.

Scores are compared with a tolerance; -inf positions, -1 padding and candidate counts
exactly; selected pages as sets, allowing swaps only between near-tied scores.
"""

from __future__ import annotations

import pytest
import torch

import sglang_freekv.kernels.select as select_mod
from sglang_freekv.kernels import (
    cpu_score_pages,
    cpu_select_window,
    cpu_window_scores,
    plan_cpu_window,
    ref_page_digest,
    ref_score_pages,
    ref_select_pages,
    score_pages,
    select_pages,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATOL, RTOL = 1e-5, 1e-4  # all math is fp32 in both paths; only summation order differs
MAX_PAGES = 12
NUM_HOST_PAGES = 40


def _make_batch(
    num_kv_heads: int, group_size: int, page_size: int, head_dim: int, dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Ragged batch of 4: a wide range with a hole (-1) in the table, an empty range, a
    one-page range, and a range clipped at max_pages. Digests come from real keys."""
    num_qo_heads = num_kv_heads * group_size
    keys = torch.randn(NUM_HOST_PAGES * page_size, num_kv_heads, head_dim, device=device)
    loc = torch.arange(NUM_HOST_PAGES, device=device) * page_size
    digests = ref_page_digest(keys.to(dtype), loc, page_size)  # [NHP, H, 2, D]
    q = (2.0 * torch.randn(4, num_qo_heads, head_dim, device=device)).to(dtype)
    page_table = torch.stack(
        [torch.randperm(NUM_HOST_PAGES, device=device)[:MAX_PAGES] for _ in range(4)]
    ).to(torch.int32)  # [4, MAX_PAGES]
    page_table[0, 4] = -1  # a hole inside request 0's candidate range
    page_table[2, 7:] = -1  # request 2 has only 7 pages
    cand_start = torch.tensor([1, 3, 5, 2], dtype=torch.int32, device=device)
    cand_end = torch.tensor([11, 3, 6, MAX_PAGES + 4], dtype=torch.int32, device=device)
    return q, digests, page_table, cand_start, cand_end


def _spec_scores(q: torch.Tensor, digests: torch.Tensor, page_table: torch.Tensor,
                 cand_start: torch.Tensor, cand_end: torch.Tensor,
                 num_kv_heads: int, scale: float = 1.0) -> torch.Tensor:
    """The formula of the module docstring, one (request, query head) at a time."""
    bs, num_qo_heads, _ = q.shape
    group_size = num_qo_heads // num_kv_heads
    out = torch.full((bs, num_kv_heads, page_table.shape[1]), float("-inf"))
    for b in range(bs):
        cand = [j for j in range(page_table.shape[1])
                if int(cand_start[b]) <= j < int(cand_end[b]) and int(page_table[b, j]) >= 0]
        if not cand:
            continue
        for g in range(num_kv_heads):
            probs = torch.zeros(len(cand))
            for h in range(g * group_size, (g + 1) * group_size):
                qh = q[b, h].float().cpu()
                s = torch.tensor([
                    sum(max(qh[i] * dmin[i], qh[i] * dmax[i]) for i in range(qh.shape[0]))
                    for dmin, dmax in (digests[int(page_table[b, j]), g].float().cpu()
                                       for j in cand)
                ])
                probs += torch.softmax(s * scale, dim=0) / group_size
            out[b, g, cand] = probs
    return out


def _assert_same_selection(idx: torch.Tensor, vals: torch.Tensor, ref_scores: torch.Tensor,
                           top_k: int) -> None:
    """idx/vals from the kernel path vs reference scores [bs, H, max_pages]."""
    n_cand = torch.isfinite(ref_scores).sum(-1)  # [bs, H]
    expect_valid = torch.clamp(n_cand, max=top_k)
    assert torch.equal((idx >= 0).sum(-1).cpu(), expect_valid.cpu())
    assert torch.equal(idx < 0, vals == float("-inf"))
    bs, num_kv_heads, _ = idx.shape
    for b in range(bs):
        for g in range(num_kv_heads):
            sel = idx[b, g][idx[b, g] >= 0].long()
            assert sel.unique().numel() == sel.numel()
            if sel.numel() == 0:
                continue
            ref_row = ref_scores[b, g]
            torch.testing.assert_close(vals[b, g, : sel.numel()], ref_row[sel], atol=ATOL,
                                       rtol=RTOL)
            # Any page the kernel skipped must not beat the worst page it kept (up to ties).
            kth = ref_row[sel].min()
            skipped = torch.ones_like(ref_row, dtype=torch.bool)
            skipped[sel] = False
            assert bool((ref_row[skipped] <= kth + ATOL + RTOL * kth.abs()).all())


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("page_size", [16, 32], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("group_size", [1, 3, 4, 8], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("scale", [1.0, 0.125], ids=lambda s: f"s{s}")
def test_score_and_select_match_ref(
    scale: float, group_size: int, page_size: int, head_dim: int, dtype: str,
    device: torch.device,
) -> None:
    num_kv_heads = 2
    args = _make_batch(num_kv_heads, group_size, page_size, head_dim, DTYPES[dtype], device)
    out = score_pages(*args, num_kv_heads, impl="triton", scale=scale)
    ref = ref_score_pages(*args, num_kv_heads, scale)
    assert out.shape == (4, num_kv_heads, MAX_PAGES) and out.dtype == torch.float32
    assert torch.equal(torch.isinf(out), torch.isinf(ref))  # exact candidate masks
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    sums = torch.where(torch.isinf(ref), 0.0, ref).sum(-1)  # [bs, H]: 1 or 0 (no candidates)
    torch.testing.assert_close(sums[[0, 2, 3]], torch.ones_like(sums[[0, 2, 3]]))
    assert bool((sums[1] == 0).all())
    for top_k in (1, 9):
        idx, vals = select_pages(*args, num_kv_heads, top_k, impl="triton", scale=scale)
        assert idx.shape == vals.shape == (4, num_kv_heads, top_k)
        assert idx.dtype == torch.int32 and vals.dtype == torch.float32
        _assert_same_selection(idx, vals, ref, top_k)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [8, 24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group_size", [1, 3, 4], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("scale", [1.0, 0.125], ids=lambda s: f"s{s}")
def test_cpu_path_matches_ref(scale: float, group_size: int, head_dim: int, dtype: str) -> None:
    """The batched CPU serving path (one matmul over the candidate window) vs the spec."""
    args = _make_batch(2, group_size, 16, head_dim, DTYPES[dtype], torch.device("cpu"))
    out = cpu_score_pages(*args, 2, scale)
    ref = ref_score_pages(*args, 2, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.equal(torch.isinf(out), torch.isinf(ref))  # exact candidate masks
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for top_k in (1, 9, MAX_PAGES + 3):
        idx, vals = select_pages(*args, 2, top_k, impl="cpu", scale=scale)
        _assert_same_selection(idx, vals, ref, top_k)


def test_cpu_path_single_request_window() -> None:
    """Windows that start past 0 and end before max_pages, one request, and a batch whose
    candidate ranges do not overlap (the shared window has positions that are nobody's)."""
    q, digests, page_table, _, _ = _make_batch(2, 3, 16, 24, torch.float32,
                                               torch.device("cpu"))
    for cs, ce in (([5], [9]), ([0], [1]), ([2, 9], [4, 12])):
        n = len(cs)
        args = (q[:n], digests, page_table[:n], torch.tensor(cs, dtype=torch.int32),
                torch.tensor(ce, dtype=torch.int32))
        torch.testing.assert_close(cpu_score_pages(*args, 2, 0.3), ref_score_pages(*args, 2, 0.3),
                                   atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cpu_path_is_batch_invariant(dtype: str) -> None:
    """A request's scores alone (its own table width and window) equal, bit for bit, its row
    in a ragged batch of 8 with longer and shorter requests: a GEMM whose width follows the
    batch would change them in the last bits and flip near-ties of the top-k (a request's
    answer would then depend on what else runs; docs/design.md "Batch invariance")."""
    gen = torch.Generator().manual_seed(3)
    h, g, d, nhp = 3, 3, 64, 900
    keys = torch.randn(nhp * 4, h, d, generator=gen).to(DTYPES[dtype])
    digests = ref_page_digest(keys, torch.arange(nhp) * 4, 4)  # [nhp, H, 2, D]
    lens = [130, 40, 70, 125, 33, 90, 128, 60]
    table = torch.full((8, max(lens)), -1, dtype=torch.int32)
    perm = torch.randperm(nhp, generator=gen).to(torch.int32)
    for b, n in enumerate(lens):
        table[b, :n] = perm[sum(lens[:b]):sum(lens[:b]) + n]
    cs = torch.full((8,), 2, dtype=torch.int32)
    ce = torch.tensor([n - 4 for n in lens], dtype=torch.int32)
    q = (2.0 * torch.randn(8, h * g, d, generator=gen)).to(DTYPES[dtype])
    batch = cpu_score_pages(q, digests, table, cs, ce, h, 0.125, 0.5)
    for b, n in enumerate(lens):
        alone = cpu_score_pages(q[b:b + 1], digests, table[b:b + 1, :n], cs[b:b + 1],
                                ce[b:b + 1], h, 0.125, 0.5)
        assert torch.equal(batch[b, :, :n], alone[0]), b
        assert torch.isinf(batch[b, :, n:]).all(), b
    # a planned window's subset of rows (a CPU correction of some requests) scores and
    # selects exactly those rows of the full window
    win = plan_cpu_window(table, cs, ce)
    full = cpu_window_scores(win, q, digests, h, 0.125, 0.5)
    idx = torch.tensor([6, 1, 3])
    sub = win.take(idx)
    assert torch.equal(cpu_window_scores(sub, q[idx], digests, h, 0.125, 0.5), full[idx])
    sel, vals = cpu_select_window(sub, q[idx], digests, h, 5, 0.125, 0.5)
    ref_sel, ref_vals = select_pages(q[idx], digests, table[idx], cs[idx], ce[idx], h, 5,
                                     impl="cpu", scale=0.125, span_weight=0.5)
    assert torch.equal(sel, ref_sel) and torch.equal(vals, ref_vals)


@pytest.mark.parametrize("group_size", [1, 3], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("scale", [1.0, 0.3], ids=lambda s: f"s{s}")
def test_ref_matches_scalar_spec(group_size: int, scale: float) -> None:
    args = _make_batch(2, group_size, 16, 8, torch.float32, torch.device("cpu"))
    ref = ref_score_pages(*args, 2, scale)
    torch.testing.assert_close(ref, _spec_scores(*args, 2, scale), atol=1e-5, rtol=1e-4)


def test_scale_sharpens_scores() -> None:
    """A smaller temperature flattens the per-head softmax (scale -> 0: uniform)."""
    args = _make_batch(2, 3, 16, 8, torch.float32, torch.device("cpu"))
    sharp, flat = ref_score_pages(*args, 2, 1.0), ref_score_pages(*args, 2, 1e-6)
    ok = ~torch.isinf(sharp)
    assert torch.equal(ok, ~torch.isinf(flat))
    n = ok.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(torch.where(ok, flat, 0.0), torch.where(ok, 1.0 / n, 0.0))
    assert float(sharp[ok].std()) > float(flat[ok].std())


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), True])
def test_bad_scale_is_refused(scale: float) -> None:
    args = _make_batch(2, 3, 16, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="scale"):
        ref_score_pages(*args, 2, scale)


def test_select_padding_and_order(device: torch.device) -> None:
    """top_k beyond the candidates (and beyond max_pages) pads with -1 / -inf; the
    reference result is sorted best first."""
    args = _make_batch(2, 4, 16, 24, torch.float32, device)
    idx, vals = ref_select_pages(*args, 2, MAX_PAGES + 3)
    assert idx.shape == (4, 2, MAX_PAGES + 3)
    assert bool((idx[1] == -1).all()) and bool((vals[1] == float("-inf")).all())
    assert bool((idx[2, :, 0] == 5).all()) and bool((idx[2, :, 1:] == -1).all())
    assert bool((vals[:, :, :-1] >= vals[:, :, 1:]).all())
    kidx, kvals = select_pages(*args, 2, MAX_PAGES + 3, impl="triton")
    assert torch.equal(kidx < 0, idx < 0)
    _assert_same_selection(kidx, kvals, ref_score_pages(*args, 2), MAX_PAGES + 3)


def test_select_all_tied(device: torch.device) -> None:
    """Identical digests tie every candidate: any top_k distinct candidates are valid."""
    q, digests, page_table, cs, ce = _make_batch(1, 4, 16, 24, torch.float32, device)
    digests = digests[:1].expand_as(digests).contiguous()
    idx, vals = select_pages(q, digests, page_table, cs, ce, 1, 3, impl="triton")
    torch.testing.assert_close(vals[0, 0], torch.full((3,), 1 / 9, device=device))  # 9 cands
    sel = idx[0, 0].tolist()
    assert len(set(sel)) == 3 and all(1 <= j < 11 and j != 4 for j in sel)


@pytest.mark.parametrize("impl", ["triton", "cpu", "ref"])
def test_select_degenerate_shapes(impl: str, device: torch.device) -> None:
    """No logical pages at all (max_pages 0) and an empty batch."""
    q = torch.randn(2, 4, 24, device=device)
    digests = torch.randn(5, 2, 2, 24, device=device)
    zeros = torch.zeros(2, dtype=torch.int32, device=device)
    no_pages = torch.empty(2, 0, dtype=torch.int32, device=device)
    idx, vals = select_pages(q, digests, no_pages, zeros, zeros, 2, 3, impl=impl)
    assert bool((idx == -1).all()) and bool((vals == float("-inf")).all())
    assert idx.shape == (2, 2, 3)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    idx, vals = select_pages(q[:0], digests, no_pages[:0], empty, empty, 2, 3, impl=impl)
    assert idx.shape == vals.shape == (0, 2, 3)


def test_score_strided_q(device: torch.device) -> None:
    """q as a slice of a fused qkv tensor (head and batch strides not dense)."""
    _, digests, page_table, cs, ce = _make_batch(2, 3, 16, 24, torch.float32, device)
    qkv = torch.randn(4, 10, 24, device=device)
    q = qkv[:, :6]  # [4, 6, 24], stride (240, 24, 1)
    ref = ref_score_pages(q, digests, page_table, cs, ce, 2)
    for impl in ("triton", "cpu"):
        torch.testing.assert_close(score_pages(q, digests, page_table, cs, ce, 2, impl=impl),
                                   ref, atol=ATOL, rtol=RTOL)


def test_score_routes_cpu_to_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _make_batch(2, 2, 16, 24, torch.float32, torch.device("cpu"))

    class _Boom:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("Triton kernel launched for CPU tensors")

    monkeypatch.setattr(select_mod, "_raw_score_kernel", _Boom())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(score_pages(*args, 2), cpu_score_pages(*args, 2))
    assert torch.equal(score_pages(*args, 2, impl="ref"), ref_score_pages(*args, 2))
    idx, vals = select_pages(*args, 2, 3)
    _assert_same_selection(idx, vals, ref_score_pages(*args, 2), 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(AssertionError, match="launched"):
        score_pages(*args, 2)


def _valid_args() -> dict[str, object]:
    q, digests, page_table, cs, ce = _make_batch(2, 2, 16, 24, torch.float32,
                                                 torch.device("cpu"))
    return dict(q=q, digests=digests, page_table=page_table, cand_start=cs, cand_end=ce,
                num_kv_heads=2, top_k=3)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(q=torch.randn(4, 4)), "q"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(digests=torch.randn(40, 2, 24, 2)), "digests"),
        (dict(page_table=torch.zeros(3, MAX_PAGES, dtype=torch.int32)), "page_table"),
        (dict(page_table=torch.zeros(4, MAX_PAGES)), "page_table"),
        (dict(cand_start=torch.zeros(4)), "cand_start"),
        (dict(cand_end=torch.zeros(5, dtype=torch.int32)), "cand_end"),
        (dict(top_k=0), "top_k"),
        (dict(impl="torch"), "impl"),
    ],
    ids=["q_rank", "heads", "digests", "pt_bs", "pt_dtype", "cs_dtype", "ce_shape", "top_k",
         "impl"],
)
def test_select_validation(kwargs: dict[str, object], name: str) -> None:
    args = _valid_args()
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        select_pages(**args)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_select_gpu_large(dtype: str) -> None:
    """128K context (4096 pages of 32), 8 KV heads, 32 query heads, D 128, batch 3."""
    dev, max_pages = torch.device("cuda"), 4096
    digests = torch.randn(3 * max_pages, 8, 2, 128, device=dev).sort(dim=2).values.to(
        DTYPES[dtype])
    q = torch.randn(3, 32, 128, device=dev).to(DTYPES[dtype])
    page_table = torch.randperm(3 * max_pages, device=dev).view(3, max_pages).to(torch.int32)
    cs = torch.tensor([16, 16, 0], dtype=torch.int32, device=dev)
    ce = torch.tensor([max_pages - 16, 17, 0], dtype=torch.int32, device=dev)
    args = (q, digests, page_table, cs, ce, 8)
    out, ref = score_pages(*args), ref_score_pages(*args)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-3)
    idx, vals = select_pages(*args, 64)
    _assert_same_selection(idx, vals, ref, 64)


# ---------------------------------------------------------------- span continuation
def _spec_span(scores: torch.Tensor, w: float) -> torch.Tensor:
    """The span rule one page at a time: max(own, w * unboosted predecessor) on candidates."""
    out = scores.clone()
    bs, h, n = scores.shape
    for b in range(bs):
        for g in range(h):
            for j in range(1, n):
                own, prev = float(scores[b, g, j]), float(scores[b, g, j - 1])
                if own != float("-inf") and prev != float("-inf"):
                    out[b, g, j] = max(own, w * prev)
    return out


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group_size", [1, 3, 4, 8], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("span_weight", [0.5, 1.0], ids=lambda w: f"w{w}")
def test_span_weight_matches_spec(span_weight: float, group_size: int, head_dim: int,
                                  dtype: str, device: torch.device) -> None:
    """Kernel, CPU path and reference agree with the rule applied to the plain scores
    (holes in the page table and clipped ranges included: a hole breaks a span)."""
    args = _make_batch(2, group_size, 16, head_dim, DTYPES[dtype], device)
    plain = ref_score_pages(*args, 2, 0.125)
    want = _spec_span(plain.cpu(), span_weight)
    ref = ref_score_pages(*args, 2, 0.125, span_weight)
    torch.testing.assert_close(ref.cpu(), want, atol=ATOL, rtol=RTOL)
    for impl in ("triton", "cpu"):
        out = score_pages(*args, 2, impl=impl, scale=0.125, span_weight=span_weight)
        assert torch.equal(torch.isinf(out), torch.isinf(ref))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        for top_k in (1, 5, MAX_PAGES + 2):
            idx, vals = select_pages(*args, 2, top_k, impl=impl, scale=0.125,
                                     span_weight=span_weight)
            _assert_same_selection(idx, vals, ref, top_k)


@pytest.mark.parametrize("impl", ["triton", "cpu", "ref"])
def test_span_weight_keeps_the_successor(impl: str, device: torch.device) -> None:
    """A head reading page 5 hard (one matching key): with span_weight its successor 6, a
    page of unrelated keys, joins the top-2; without it another page does."""
    d, p, pages = 16, 8, 12
    gen = torch.Generator().manual_seed(0)
    keys = 0.1 * torch.randn(pages * p, 1, d, generator=gen)
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    keys[5 * p + 3, 0, 0] = 8.0  # the key the head reads
    keys[9 * p + 1, 0, 0] = 1.5  # a weaker match elsewhere
    dg = ref_page_digest(keys, torch.arange(pages) * p, p).to(device)
    pt = torch.arange(pages, dtype=torch.int32, device=device)[None]
    cs = torch.tensor([1], dtype=torch.int32, device=device)
    ce = torch.tensor([pages], dtype=torch.int32, device=device)
    run = (lambda w: ref_select_pages(q.to(device), dg, pt, cs, ce, 1, 2, 1.0, w)) \
        if impl == "ref" else (lambda w: select_pages(q.to(device), dg, pt, cs, ce, 1, 2,
                                                      impl=impl, scale=1.0, span_weight=w))
    plain, _ = run(0.0)
    span, _ = run(0.5)
    assert set(plain[0, 0].tolist()) == {5, 9}
    assert set(span[0, 0].tolist()) == {5, 6}


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_span_weight_is_refused(w: object) -> None:
    args = _make_batch(2, 3, 16, 8, torch.float32, torch.device("cpu"))
    for fn in (ref_score_pages, cpu_score_pages):
        with pytest.raises(ValueError, match="span_weight"):
            fn(*args, 2, 1.0, w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="span_weight"):
        score_pages(*args, 2, impl="triton", span_weight=w)  # type: ignore[arg-type]


@pytest.mark.parametrize("span_weight", [0.0, 0.5])
def test_head_mask_scores_only_the_flagged_heads(device: torch.device,
                                                 span_weight: float) -> None:
    """Masked-out (request, KV head) pairs score -inf everywhere (their top-k is -1); the
    others score exactly as without a mask, on every path."""
    from sglang_freekv.kernels.select import score_pages, select_pages

    bs, hq, h, d, pages = 3, 8, 4, 24, 37
    q = torch.randn(bs, hq, d, device=device)
    dig = torch.randn(pages + 5, h, 2, d, device=device).sort(dim=2).values
    table = torch.randperm(pages + 5)[:pages].repeat(bs, 1).to(device, torch.int32)
    cs = torch.tensor([1, 0, 3], dtype=torch.int32, device=device)
    ce = torch.tensor([30, 37, 12], dtype=torch.int32, device=device)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool,
                        device=device)
    for impl in (None, "ref"):
        full = score_pages(q, dig, table, cs, ce, h, impl=impl, scale=0.3,
                           span_weight=span_weight)
        part = score_pages(q, dig, table, cs, ce, h, impl=impl, scale=0.3,
                           span_weight=span_weight, head_mask=mask)
        assert torch.equal(part[mask], full[mask])
        assert bool((part[~mask] == float("-inf")).all())
        idx, _ = select_pages(q, dig, table, cs, ce, h, 4, impl=impl, scale=0.3,
                              span_weight=span_weight, head_mask=mask)
        assert bool((idx[~mask] == -1).all()) and bool((idx[mask] >= 0).all())
