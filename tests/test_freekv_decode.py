"""The GPU decode path (SGLang's Triton decode kernel over FreeKV's budget rows) against the
CPU torch path, on CPU under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) or on CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.kernels.ops.attention.decode_attention")

from sglang_freekv.patches.freekv_decode import triton_decode  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sdpa_reference(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                    indptr: torch.Tensor, indices: torch.Tensor, scaling: float) -> torch.Tensor:
    """What the freekv backend's torch path computes: per request, SDPA over its rows."""
    out = []
    h = kb.shape[1]
    for b in range(q.shape[0]):
        rows = indices[int(indptr[b]) : int(indptr[b + 1])]
        k = kb[rows].float().transpose(0, 1)  # [H, n, D]
        v = vb[rows].float().transpose(0, 1)
        qb = q[b].float().view(h, -1, q.shape[-1])  # [H, G, D]
        w = torch.softmax(qb @ k.transpose(1, 2) * scaling, dim=-1)  # [H, G, n]
        out.append((w @ v).reshape(q.shape[1], -1))
    return torch.stack(out)


@pytest.mark.parametrize("group", [1, 3], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("lens", [(1, 37), (300, 5, 600)], ids=lambda x: f"lens{len(x)}")
def test_triton_decode_matches_torch_path(group: int, lens: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    h, d, rows = 2, 64, 2048
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    kb = torch.randn(rows, h, d, dtype=dtype, device=DEVICE)
    vb = torch.randn(rows, h, d, dtype=dtype, device=DEVICE)
    q = torch.randn(len(lens), h * group, d, dtype=dtype, device=DEVICE)
    # Scattered, non-contiguous rows per request, as budget slots are.
    perm = torch.randperm(rows, device=DEVICE)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=DEVICE)
    indptr[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    indices = perm[: int(indptr[-1])].to(torch.int64)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scaling = d**-0.5
    out = triton_decode(q, kb, vb, indptr, indices, kv_lens, scaling)
    ref = _sdpa_reference(q, kb, vb, indptr, indices, scaling)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_bad_buffers_are_refused() -> None:
    q = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k_buffer"):
        triton_decode(q, torch.zeros(4, 2, 16, device=DEVICE), torch.zeros(4, 2, 16, device=DEVICE),
                      torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                      torch.zeros(1, dtype=torch.int64, device=DEVICE),
                      torch.ones(1, dtype=torch.int32, device=DEVICE), 1.0)
