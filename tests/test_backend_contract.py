"""What the freekv backend hands SGLang's FlashInfer backend for a sparse layer's decode.

SGLang's own ``FlashInferIndicesUpdaterDecode.call_begin_forward`` runs (its index kernel
under ``TRITON_INTERPRET=1`` on CPU) with the sparse instance's table translator pointed at a
decode plan's budget table, as in ``patches/freekv_backend.py``; a recording wrapper takes
the ``plan`` arguments. They must be FlashInfer's paged-decode contract over the budget rows
(page size 1: ``indptr = [0, cumsum(kv_lens)]``, ``indices`` = each request's budget rows in
attention order, ``last_page_len`` = 1), and a torch reference of that contract must give
FreeKV's attention (and dense attention in the dense regime).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.layers.attention.flashinfer_backend")

from sglang.srt.layers.attention.flashinfer_backend import (  # noqa: E402
    FlashInferIndicesUpdaterDecode,
)
from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator  # noqa: E402

from sglang_freekv.attention import ref_decode_attention  # noqa: E402
from tests.core.test_serving import HQ, Engine  # noqa: E402


class _RecordingWrapper:
    """Stands in for ``BatchDecodeWithPagedKVCacheWrapper`` (graph mode: fixed buffers)."""

    is_cuda_graph_enabled = True

    def __init__(self, max_indices: int) -> None:
        self._paged_kv_indices_buf = torch.full((max_indices,), -7, dtype=torch.int32)
        self.calls: list[tuple[tuple, dict]] = []

    def begin_forward(self, *args: object, **kwargs: object) -> None:
        self.calls.append((args, kwargs))


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor,
                     page_size: int, scale: float) -> torch.Tensor:
    """FlashInfer's paged decode contract in torch (NHD): request ``b`` attends over pages
    ``indices[indptr[b]:indptr[b+1]]`` of ``page_size`` rows, the last one holding
    ``last_page_len[b]`` rows. ``q [bs, Hq, D]``, caches ``[pages * page_size, H, D]``."""
    out = []
    h = k_cache.shape[1]
    for b in range(q.shape[0]):
        pages = indices[int(indptr[b]):int(indptr[b + 1])].to(torch.int64)
        rows = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
        rows = rows[: (len(pages) - 1) * page_size + int(last_page_len[b])]
        k = k_cache[rows].float().transpose(0, 1)  # [H, n, D]
        v = v_cache[rows].float().transpose(0, 1)
        qb = q[b].float().view(h, -1, q.shape[-1])  # [H, G, D]
        w = torch.softmax(qb @ k.transpose(1, 2) * scale, dim=-1)
        out.append((w @ v).reshape(q.shape[1], -1))
    return torch.stack(out).to(q.dtype)


def test_flashinfer_plan_arguments_over_budget_pages() -> None:
    e = Engine(k=2)  # budget 5 pages of 4 = 20 rows
    s = e.serving
    e.prefill([0, 3], [9, 41])  # dense regime / sparse
    for _ in range(3):
        plan = e.decode([0, 3])
    s.cache.recall.wait_all()  # no interpreted kernel on the recall worker meanwhile
    bs = plan.bs
    translator = KVIndexTranslator(req_to_token=plan.kv_table, token_to_kv_pool_allocator=None,
                                   token_to_kv_pool=object(), page_size=1, device="cpu")
    updater = object.__new__(FlashInferIndicesUpdaterDecode)
    updater.attn_backend = type("Backend", (), {"kv_index_translator": translator})()
    updater.kv_indptr = [torch.zeros(9, dtype=torch.int32)]
    updater.kv_last_page_len = torch.ones(8, dtype=torch.int32)
    updater.num_qo_heads, updater.num_kv_heads, updater.head_dim = HQ, 2, 8
    updater.data_type = updater.q_data_type = torch.float32
    updater._swa_kv_pool = None
    wrapper = _RecordingWrapper(64)
    lens_cpu = plan.kv_lens_cpu.to(torch.int64)
    updater.call_begin_forward(
        wrapper, plan.kv_lens, int(lens_cpu.sum()), updater.kv_indptr[0], None, None,
        lens_cpu, plan=None, req_pool_indices=torch.arange(bs))
    (args, kwargs), = wrapper.calls
    indptr, indices, last_page_len, hq, h, d, page_size = args[:7]
    want_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens_cpu.cumsum(0)])
    assert indptr.tolist() == want_indptr.tolist()
    total = int(want_indptr[-1])
    want_rows = torch.cat([plan.kv_table[b, :int(lens_cpu[b])] for b in range(bs)])
    assert indices[:total].tolist() == want_rows.tolist()
    assert torch.equal(want_rows.to(torch.int64), plan.kv_indices)  # FreeKV's own row list
    assert last_page_len.tolist() == [1] * bs and page_size == 1
    assert (hq, h, d) == (HQ, 2, 8) and kwargs["q_data_type"] == torch.float32
    for layer in (1, 2):
        q = torch.randn(bs, HQ, 8)
        got = paged_decode_ref(q, e.kb[layer], e.vb[layer], indptr, indices, last_page_len, 1,
                               0.35)
        want = ref_decode_attention(q, e.kb[layer], e.vb[layer], plan.kv_indptr,
                                    plan.kv_indices, 0.35)
        torch.testing.assert_close(got, want)
        # row 0 (10+2 tokens < budget): exact dense attention over its logical ids' K/V
        ids = e.r2t[0, :e.lens[0]].to(torch.int64)
        dense = ref_decode_attention(q[:1], e.truth_k[layer], e.truth_v[layer],
                                     torch.tensor([0, len(ids)]), ids, 0.35)
        torch.testing.assert_close(got[:1], dense)
