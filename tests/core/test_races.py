"""One test per race of freekv-method.md §8 (items 5-9).

Each test runs a speculative decode with the CPU worker's debug hooks widening the race
window, and checks the selection rule (b) / slot content (c) or the attention output.
It passes with the protection and is shown to FAIL with the protection removed (the test
replaces the protecting method of the cache, or the recall worker, from outside), so removing
a protection breaks it.
The per-layer job (the GPU design) is tested for every race; the per-step job (the CPU
default) for the races it has: 5 (attention fences), 6 (persistent q) and 7 (the Future).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from sglang_freekv.reference import ReferenceDecoder

from .conftest import RuleChecker, make_cfg


def _decoder(tau: float | None = None, job: str = "layer", **kw: object) -> ReferenceDecoder:
    cfg = make_cfg(16, k=3, tau=tau, speculative_job=job)
    return ReferenceDecoder(cfg, num_layers=3, num_qo_heads=4, num_kv_heads=2, max_len=400,
                            recall_group_blocks=2, seed=7, **kw)  # type: ignore[arg-type]


def _worker_sleep(point: str, seconds: float) -> Callable[[str], None]:
    def hook(p: str) -> None:
        if p == point and threading.current_thread().name.startswith("freekv-recall"):
            time.sleep(seconds)
    return hook


def _unprotect(dec: ReferenceDecoder, race: int) -> None:
    """Remove the protection of ``race`` from the decoder's cache, from outside."""
    cache = dec.cache
    if race == 5:
        cache._scatter_fence = lambda attn_done: None  # type: ignore[method-assign]
    elif race == 6:  # select with the engine's reused q buffer, by batch position
        cache._job_query = lambda layer, q, plan, rows_j, jr: (  # type: ignore[method-assign]
            q, jr if jr is not None else torch.arange(plan.bs, device=q.device))
    elif race == 7:  # forget the job without waiting its Future
        cache._wait_job = lambda layer: cache._jobs.pop(layer, None)  # type: ignore[method-assign]
    elif race == 8:  # two workers instead of one ordered worker
        eng = cache.recall
        eng.wait_all()
        eng._executor.shutdown(wait=True)
        eng._executor = eng._new_executor(2)
    elif race == 9:  # read the shared flags buffer later instead of a snapshot
        cache._job_head_mask = lambda step, pick: (None, step.flags)  # type: ignore[method-assign]


def _run(dec: ReferenceDecoder, steps: int, *, late: float | None = None,
         check: bool = True) -> None:
    rows = [dec.add_request(n) for n in (150, 183, 230)]
    checker = RuleChecker(dec) if check else None
    try:
        for s in range(steps):
            out = dec.step(rows, on_layer=checker, late_attention_s=late)
            if late is not None:
                for layer, (o, lo) in enumerate(zip(out.outputs, out.late)):
                    assert torch.equal(o, lo), f"step {s} layer {layer}: slots changed " \
                                               "under a running attention"
    finally:
        try:
            dec.cache.recall.wait_all()
        except Exception:  # noqa: BLE001 - a job broken by the unsafe mode
            pass
    for r in rows:
        dec.remove_request(r)
    assert dec.cache.host.used_pages == 0


@pytest.mark.parametrize("job", ["layer", "step"])
@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race5_scatter_waits_attention(unsafe: bool, job: str) -> None:
    """(5) The speculative scatter must not overwrite slots a running attention reads."""
    dec = _decoder(job=job)
    if unsafe:
        _unprotect(dec, 5)
    if unsafe:
        with pytest.raises(AssertionError, match="under a running attention"):
            _run(dec, 8, late=0.03, check=False)
    else:
        _run(dec, 8, late=0.03, check=False)


@pytest.mark.parametrize("unsafe,job", [(False, "layer"), (True, "layer"), (False, "step")],
                         ids=["protected-layer", "unprotected-layer", "protected-step"])
def test_race6_selection_reads_persistent_q(unsafe: bool, job: str) -> None:
    """(6) The job selects with the persistent last_q, not the engine's reused q buffer
    (the step job has no unsafe mode: it only ever reads last_q)."""
    dec = _decoder(reuse_q_buffer=True, job=job)
    dec.cache.recall._checkpoint = _worker_sleep("job_start", 0.02)  # type: ignore[method-assign]
    if unsafe:
        _unprotect(dec, 6)
        with pytest.raises(AssertionError):
            _run(dec, 10)
    else:
        _run(dec, 10)


@pytest.mark.parametrize("job", ["layer", "step"])
@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race7_wait_job_future_before_event(unsafe: bool, job: str) -> None:
    """(7) before_attention waits the job (Future, then event): no stale slots attended."""
    dec = _decoder(job=job)
    dec.cache.recall._checkpoint = _worker_sleep("job_start", 0.03)  # type: ignore[method-assign]
    if unsafe:
        _unprotect(dec, 7)
        with pytest.raises(AssertionError):
            _run(dec, 10)
    else:
        _run(dec, 10)


@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race8_layers_do_not_share_staging(unsafe: bool) -> None:
    """(8) Two layers' jobs in flight: each scatters its own layer's data."""
    dec = _decoder()
    dec.cache.recall._checkpoint = _worker_sleep("gathered", 0.01)  # type: ignore[method-assign]
    if unsafe:
        _unprotect(dec, 8)
        with pytest.raises(AssertionError):
            _run(dec, 10)
    else:
        _run(dec, 10)


@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race9_flags_snapshot_per_job(unsafe: bool) -> None:
    """(9) The job's head mask is a snapshot: the next layer's flags must not leak in."""
    # sigma 0.5 => cos ~ tau: about half the heads corrected, differently per layer.
    dec = _decoder(tau=0.8, q_noise=(0.5,))
    dec.cache.recall._checkpoint = _worker_sleep("job_start", 0.02)  # type: ignore[method-assign]
    if unsafe:
        _unprotect(dec, 9)
        with pytest.raises(AssertionError):
            _run(dec, 12)
    else:
        _run(dec, 12)
