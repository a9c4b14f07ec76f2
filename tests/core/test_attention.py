"""CPU decode attention: the row-wise gather and ``sdpa_decode`` against torch_native's logic."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_freekv.attention import gather_rows, ref_decode_attention, sdpa_decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 3, 64), (37, 3, 5), (37, 1, 1), (37, 2, 3, 4)])
def test_gather_rows_is_indexing(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    buf = torch.randn(shape).to(dtype)
    rows = torch.tensor([5, 0, 36, 5, 17], dtype=torch.int64)
    out = gather_rows(buf, rows)
    assert out.dtype == dtype and out.shape == (5, *shape[1:]) and out.is_contiguous()
    assert torch.equal(out, buf[rows])
    strided = buf.transpose(0, 1) if buf.dim() > 1 else buf  # non-contiguous: plain indexing
    assert torch.equal(gather_rows(strided, torch.tensor([0])), strided[torch.tensor([0])])
    assert gather_rows(buf, rows[:0]).shape == (0, *shape[1:])


def _torch_native_decode(q, kb, vb, table, lens, scale):  # type: ignore[no-untyped-def]
    """SGLang torch_native's per-request decode, written out (advanced-index gather)."""
    out = torch.empty_like(q)
    qh = q.movedim(0, 1)
    for b, n in enumerate(lens):
        k, v = kb[table[b, :n]].movedim(0, 1), vb[table[b, :n]].movedim(0, 1)
        o = scaled_dot_product_attention(qh[:, b:b + 1].unsqueeze(0), k.unsqueeze(0),
                                         v.unsqueeze(0), enable_gqa=q.shape[1] != kb.shape[1],
                                         scale=scale)
        out[b:b + 1] = o.squeeze(0).movedim(1, 0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,h,d", [(9, 3, 64), (4, 4, 24), (6, 1, 8)])
def test_sdpa_decode_is_bit_identical_to_torch_native(dtype: torch.dtype, hq: int, h: int,
                                                      d: int) -> None:
    torch.manual_seed(1)
    kb, vb = torch.randn(300, h, d).to(dtype), torch.randn(300, h, d).to(dtype)
    q = torch.randn(3, hq, d).to(dtype)
    table = torch.randint(0, 300, (3, 77))
    lens = [77, 1, 40]
    out = sdpa_decode(q, kb, vb, table, lens, d ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, _torch_native_decode(q, kb, vb, table, lens, d ** -0.5))
    # and it is attention: the fp32 reference over the same row lists agrees
    indptr = torch.tensor([0, 77, 78, 118])
    indices = torch.cat([table[0, :77], table[1, :1], table[2, :40]])
    ref = ref_decode_attention(q, kb, vb, indptr, indices, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
