"""Shared fixtures and checkers of the core tests (CPU first; CUDA variants skip without GPU)."""

from __future__ import annotations

import pytest
import torch

from sglang_freekv.config import FreeKVConfig
from sglang_freekv.reference import ReferenceDecoder, group_cosine

HAS_CUDA = torch.cuda.is_available()
torch.set_num_threads(1)  # tiny shapes; avoids OpenMP oversubscription next to the worker


@pytest.fixture(autouse=True)
def _cpu_refs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core tests use the kernels' torch references on CPU tensors (fast), even when the
    kernel tests' conftest turned the Triton interpreter on for the whole session."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)


def make_cfg(page_size: int, *, k: int = 3, sink: int = 1, window: int = 2,
             tau: float | None = 0.8, speculative: bool = True,
             dense_layers: tuple[int, ...] = (0,),
             speculative_job: str = "auto", spec_drift_limit: float = 1.0) -> FreeKVConfig:
    """A small config; ``spec_drift_limit`` 1.0 (every layer stays in the step job: plain
    FreeKV speculation) unless a test of the job's membership asks otherwise."""
    return FreeKVConfig(page_size=page_size, budget=page_size * (sink + k + window),
                        sink=page_size * sink, window=page_size * window, tau=tau,
                        speculative=speculative, dense_layers=dense_layers,
                        speculative_job=speculative_job, spec_drift_limit=spec_drift_limit)


def check_slots(dec: ReferenceDecoder, layer: int, rows: list[int]) -> int:
    """(c) every retrieved slot column holds exactly the host page its residency says, and
    that host page equals the dense truth. Returns the number of (head, slot) checked."""
    cache = dec.cache
    g = cache.g
    p = g.page_size
    kb, vb = dec.k_buffers[layer], dec.v_buffers[layer]
    checked = 0
    for row in rows:
        res = cache.residency[layer, row].cpu()  # [H, k]
        h_idx, j_idx = torch.nonzero(res >= 0, as_tuple=True)
        if h_idx.numel() == 0:
            continue
        pages = res[h_idx, j_idx].long()
        hp = cache.t.host_pages_cpu[row][pages].long()
        assert bool((hp >= 0).all())
        first = cache.t.slot_loc_cpu[row, g.sink_pages + j_idx]
        dev_rows = (first[:, None] + torch.arange(p)).to(kb.device)  # [m, P]
        hd = h_idx.to(kb.device)[:, None]
        kdev, vdev = kb[dev_rows, hd].cpu(), vb[dev_rows, hd].cpu()  # [m, P, D]
        host = cache.host.kv[layer, hp, h_idx]  # [m, 2, P, D]
        assert torch.equal(kdev, host[:, 0]), f"layer {layer} row {row}: K slot != host page"
        assert torch.equal(vdev, host[:, 1]), f"layer {layer} row {row}: V slot != host page"
        pos = pages[:, None] * p + torch.arange(p)
        truth_rows = dec.req_to_token[row].cpu()[pos].to(kb.device)
        assert torch.equal(kdev, kb[truth_rows, hd].cpu()), "host page != dense truth (K)"
        assert torch.equal(vdev, vb[truth_rows, hd].cpu()), "host page != dense truth (V)"
        checked += int(h_idx.numel())
    return checked


class RuleChecker:
    """(b) the resident set after before_attention equals the brute-force selection rule:
    non-speculative: top-k with q_t; speculative: per head q_t pages if corrected (or no
    speculative result yet) else q_{t-1} pages. Dense regime: slot j holds page ns + j."""

    def __init__(self, dec: ReferenceDecoder, slots: bool = True) -> None:
        self.dec, self.slots = dec, slots
        self.prev_q: dict[tuple[int, int], torch.Tensor] = {}
        self.sparse_checks = 0
        self.corrected = 0
        self.slot_checks = 0
        # layers the speculative job served this step (set before each step); None = all
        self.job_layers: set[int] | None = None

    def forget(self, row: int) -> None:
        for key in [k for k in self.prev_q if k[1] == row]:
            del self.prev_q[key]

    def __call__(self, layer: int, plan, q: torch.Tensor, out: torch.Tensor,
                 dense: torch.Tensor) -> None:
        dec, cfg = self.dec, self.dec.cfg
        if layer in cfg.dense_layers:
            return
        g = dec.cache.g
        h = dec.h
        for i, row in enumerate(plan.req_rows_cpu.tolist()):
            n = int(plan.seq_lens_cpu[i])
            res = dec.cache.residency[layer, row].cpu()
            n_pages = -(-n // g.page_size)
            m = max(0, n_pages - g.sink_pages - g.window_pages)
            qi = q[i].cpu()
            if m > g.top_k:
                exp_t = dec.expected_topk(layer, row, qi, n)
                prev = self.prev_q.get((layer, row))
                out_of_job = self.job_layers is not None and layer not in self.job_layers
                if not cfg.speculative or prev is None or out_of_job:
                    exp = exp_t
                else:
                    exp_prev = dec.expected_topk(layer, row, prev, n)
                    if cfg.tau is None:
                        flag = [False] * h
                    else:
                        flag = (group_cosine(qi, prev, h) < cfg.tau).tolist()
                    self.corrected += sum(flag)
                    exp = [exp_t[x] if flag[x] else exp_prev[x] for x in range(h)]
                got = [set(res[x][res[x] >= 0].tolist()) for x in range(h)]
                assert got == exp, f"layer {layer} row {row} n {n}: {got} != {exp}"
                self.sparse_checks += 1
            else:
                want = torch.full((h, g.top_k), -1, dtype=torch.int32)
                want[:, :m] = torch.arange(g.sink_pages, g.sink_pages + m, dtype=torch.int32)
                assert torch.equal(res, want), f"dense regime residency {res} != {want}"
            self.prev_q[(layer, row)] = qi.clone()
        if self.slots:
            self.slot_checks += check_slots(dec, layer, plan.req_rows_cpu.tolist())
