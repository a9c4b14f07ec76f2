"""The sync-free GPU decode step (``device_step.py``) on CPU: no host sync inside the step,
and the same selections and outputs as the host-driven step.

The device step runs with its kernels in Triton's interpreter (``TRITON_INTERPRET=1``: the
same code the GPU runs) under :class:`HostSyncGuard`, which fails on any host-synchronising
operation between the first layer's ``begin_decode_layer`` and the last layer's
``end_decode_layer``. The host-driven step (the CPU engines' default: worker thread, one job
per step) runs the same multi-step schedule, with requests joining and leaving, from the same
seed; after every step the residency of every (layer, request, head) and every sparse layer's
attention output over the budget table must match.
"""

from __future__ import annotations

import pytest
import torch

from .sync_guard import HostSync, HostSyncGuard
from .test_serving import Engine

# step -> (requests joining: (row, prompt_len), rows leaving)
SCHEDULE: dict[int, tuple[list[tuple[int, int]], list[int]]] = {
    0: ([(1, 45), (2, 23)], []),
    3: ([(3, 61)], []),
    6: ([], [2]),
    7: ([(4, 34), (5, 9)], []),
    10: ([], [1]),
    12: ([(2, 50)], []),
}
STEPS = 16


def _run(decode_step: str, tau: float | None, guard: bool) -> tuple[list, dict, int]:
    torch.manual_seed(123)
    e = Engine(k=2, decode_step=decode_step, host_pages=160, staging=128, tau=tau,
               max_reqs=5)
    s = e.serving
    active: list[int] = []
    trace = []
    checked = 0
    for step in range(STEPS):
        joins, leaves = SCHEDULE.get(step, ([], []))
        for row in leaves:
            e.finish(row, cache_ids=False)
            active.remove(row)
        if joins:
            e.prefill([r for r, _ in joins], [n for _, n in joins])
            active += [r for r, _ in joins]
        outs: list[torch.Tensor] = []
        g = HostSyncGuard() if guard else None
        e.decode(sorted(active), guard=g, outputs=outs)
        if g is not None:
            checked += g.checked
        s.cache.recall.wait_all()  # host step: its speculative job runs on a worker
        trace.append((sorted(active), s.cache.residency.clone(), outs))
    return trace, s.stats(), checked


@pytest.mark.parametrize("tau", [0.8, None], ids=["tau0.8", "no-correction"])
def test_device_step_is_sync_free_and_equals_the_host_step(
        tau: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    host, host_stats, _ = _run("host", tau, guard=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels, as on the GPU
    dev, dev_stats, checked = _run("device", tau, guard=True)
    assert checked > 1000  # the guard saw the step's torch calls
    sparse_steps = 0
    for step, ((rows_h, res_h, out_h), (rows_d, res_d, out_d)) in enumerate(zip(host, dev)):
        assert rows_h == rows_d
        for row in rows_h:
            assert torch.equal(res_h[:, row], res_d[:, row]), f"step {step} row {row}"
            sparse_steps += int((res_h[1:, row] >= 0).any())
        for layer, (a, b) in enumerate(zip(out_h, out_d)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=f"step {step} sparse layer {layer}")
    assert sparse_steps > 20
    for key in ("checked_heads", "corrected_heads", "recalled_pages", "recall_bytes"):
        assert host_stats[key] == dev_stats[key], key
    if tau is not None:
        assert dev_stats["corrected_heads"] > 0 and dev_stats["recalled_pages"] > 0


def test_the_guard_catches_host_syncs() -> None:
    t = torch.arange(4)
    for op in (lambda: t.sum().item(), lambda: bool(t[0]), lambda: t.tolist(),
               lambda: torch.nonzero(t), lambda: t[t > 1], lambda: t.cpu(),
               lambda: torch.tensor([1, 2]), lambda: t.to("cpu")):
        with pytest.raises(HostSync), HostSyncGuard():
            op()
    with HostSyncGuard():  # device-side work is fine
        (t * 2 + 1).cumsum(0).to(torch.float32)


def test_the_host_step_is_not_sync_free() -> None:
    """The guard can fail on the real decode step: the host-driven one syncs."""
    torch.manual_seed(5)
    e = Engine(k=2, decode_step="host")
    e.prefill([1], [45])
    with pytest.raises(HostSync):
        for _ in range(3):
            e.decode([1], guard=HostSyncGuard())
    e.serving.cache.recall.wait_all()
