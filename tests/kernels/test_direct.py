"""recall_direct / backup_direct (kernels/direct.py) against their references.

On CPU through Triton's interpreter; with CUDA the host tier is page-locked and mapped
(``pool_host.pin_host_tensor``) and the kernels read / write it by address.
"""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.kernels.direct import (
    backup_direct,
    recall_direct,
    ref_backup_direct,
    ref_recall_direct,
)

SHAPES = [  # (num_pages, H, P, D)
    pytest.param(7, 1, 1, 8, id="P1-H1-D8"),
    pytest.param(9, 3, 16, 24, id="P16-H3-D24"),
    pytest.param(5, 2, 32, 64, id="P32-H2-D64"),
]


def _host(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        from sglang_freekv.pool_host import pin_host_tensor

        t, _ = pin_host_tensor(shape, dtype, 1 << 12)
        t.copy_(torch.randn(shape).to(dtype))
        return t
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("pages,h,p,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recall_direct_matches_reference(pages: int, h: int, p: int, d: int,
                                         dtype: torch.dtype, device: torch.device) -> None:
    host = _host((pages, h, 2, p, d), dtype, device)
    rows = 6 * p
    n, valid = 6, 4  # padded list: entries 4, 5 are garbage and must be skipped
    ids = torch.randint(0, pages, (n,))
    heads = torch.randint(0, h, (n,))
    loc = torch.randperm(6)[:n] * p
    ids[valid:], heads[valid:], loc[valid:] = 10**6, 99, -(10**6)
    nv = torch.tensor([valid], device=device)
    kb = torch.randn(rows, h, d).to(dtype).to(device)
    vb = torch.randn(rows, h, d).to(dtype).to(device)
    kr, vr = kb.clone(), vb.clone()
    args = [ids.to(device), heads.to(device), loc.to(device), nv]
    recall_direct(host, *args, kb, vb)
    ref_recall_direct(host, *args, kr, vr)
    assert torch.equal(kb, kr) and torch.equal(vb, vr)
    # what landed is the host block, and only in that head's column
    for i in range(valid):
        blk = host[int(ids[i]), int(heads[i])].to(device)
        r = slice(int(loc[i]), int(loc[i]) + p)
        assert torch.equal(kb[r, int(heads[i])], blk[0])
        assert torch.equal(vb[r, int(heads[i])], blk[1])


@pytest.mark.parametrize("pages,h,p,d", SHAPES)
def test_backup_direct_matches_reference(pages: int, h: int, p: int, d: int,
                                         device: torch.device) -> None:
    dtype = torch.float16
    host = _host((pages, h, 2, p, d), dtype, device)
    host_ref = host.clone()
    kb = torch.randn(5 * p, h, d).to(dtype).to(device)
    vb = torch.randn(5 * p, h, d).to(dtype).to(device)
    n = min(4, pages)
    loc = (torch.randperm(5)[:n] * p).to(device)
    ids = torch.randperm(pages)[:n].to(device)
    valid = torch.tensor([True, False, True, True][:n], device=device)
    backup_direct(kb, vb, loc, ids, valid, host)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ref_backup_direct(kb, vb, loc, ids, valid, host_ref)
    assert torch.equal(host, host_ref)
    if n > 1:  # the invalid entry left its page as it was
        before = host_ref.clone()
        assert torch.equal(host[int(ids[1])], before[int(ids[1])])
        rows = int(loc[1]) + torch.arange(p)
        assert not torch.equal(host[int(ids[1]), :, 0].cpu(), kb[rows.to(device)].transpose(0, 1).cpu())


def test_bad_layout_is_refused(device: torch.device) -> None:
    host = torch.randn(4, 2, 8, 2, 16)  # [pages, H, P, 2, D]: wrong block layout
    kb = torch.zeros(32, 2, 16, device=device)
    with pytest.raises(ValueError, match="Invalid shape of host"):
        recall_direct(host, torch.zeros(1, dtype=torch.int64, device=device),
                      torch.zeros(1, dtype=torch.int64, device=device),
                      torch.zeros(1, dtype=torch.int64, device=device),
                      torch.ones(1, dtype=torch.int64, device=device), kb, kb.clone())
