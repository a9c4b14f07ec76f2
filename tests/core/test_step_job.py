"""The per-step speculative job (``speculative_job="step"``) against the per-layer one.

Both select with the same ``last_q`` and digests, so on the same seeded schedule they must
give the same residency, the same slot contents, the same attention outputs and the same
counters, step after step, through requests joining, sitting out and leaving.
"""

from __future__ import annotations

import threading

import pytest
import torch

import sglang_freekv.cache as cache_mod
from sglang_freekv.cache import FreeKVCache
from sglang_freekv.config import FreeKVConfig, FreeKVConfigError
from sglang_freekv.reference import ReferenceDecoder

from .conftest import RuleChecker, make_cfg


def _pair(tau: float | None, hq: int, h: int, page_size: int,
          q_noise: tuple[float, ...]) -> tuple[ReferenceDecoder, ReferenceDecoder]:
    decs = []
    for job in ("layer", "step"):
        cfg = make_cfg(page_size, k=3, tau=tau, speculative_job=job)
        decs.append(ReferenceDecoder(cfg, num_layers=4, num_qo_heads=hq, num_kv_heads=h,
                                     max_len=20 * page_size, recall_group_blocks=4,
                                     seed=page_size + hq, q_noise=q_noise))
    return decs[0], decs[1]


@pytest.mark.parametrize("tau,q_noise", [(0.8, (0.5,)), (None, (0.2, 0.5, 1.0))],
                         ids=["tau0.8", "no-correction"])
@pytest.mark.parametrize("hq,h", [(2, 2), (6, 2), (3, 1)])
def test_step_job_matches_layer_jobs(tau: float | None, q_noise: tuple[float, ...],
                                     hq: int, h: int) -> None:
    p = 16
    lay, stp = _pair(tau, hq, h, p, q_noise)
    assert not lay.cache._step_job and stp.cache._step_job
    checker = RuleChecker(stp)
    # dense throughout, dense -> sparse, sparse from the start
    lens = [30, p * 5 + 3, p * 11]
    rows = {id(d): [d.add_request(n) for n in lens] for d in (lay, stp)}
    for s in range(p + 8):
        for d in (lay, stp):
            if s == 4:
                rows[id(d)].append(d.add_request(p * 9 + 1))
            if s == 9:
                d.remove_request(rows[id(d)].pop(1))
        outs = [d.step(rows[id(d)][1:] if s == 6 else rows[id(d)],
                       on_layer=checker if d is stp else None) for d in (lay, stp)]
        for layer, (a, b) in enumerate(zip(outs[0].outputs, outs[1].outputs)):
            assert torch.equal(a, b), f"step {s} layer {layer}: outputs differ"
        for d in (lay, stp):
            d.cache.recall.wait_all()
        assert torch.equal(lay.cache.residency, stp.cache.residency), f"step {s}"
        for kl, ks in zip(lay.k_buffers, stp.k_buffers):
            assert torch.equal(kl, ks), f"step {s}: slot contents differ"
    a, b = lay.cache.stats(), stp.cache.stats()
    a.pop("job_wait_ns"), b.pop("job_wait_ns")  # a timing, the one counter that differs
    assert a == b
    assert a["recalled_pages"] > 0 and checker.sparse_checks > 20
    if tau is not None:
        assert 0 < a["corrected_heads"] < a["checked_heads"]
    for d in (lay, stp):
        for r in rows[id(d)]:
            d.remove_request(r)
        assert d.cache.host.used_pages == 0
        d.cache.close()


def test_step_job_is_two_futures_per_step() -> None:
    """A step submits two jobs: the first third of the sparse layers, then the rest; each
    layer waits its own."""
    dec = ReferenceDecoder(make_cfg(16, k=3, tau=None), num_layers=4, num_qo_heads=4,
                           num_kv_heads=2, max_len=320)
    rows = [dec.add_request(16 * 9), dec.add_request(16 * 12 + 5)]
    submitted = []
    orig = dec.cache.recall.submit

    def count(fn):  # type: ignore[no-untyped-def]
        submitted.append(fn)
        return orig(fn)

    dec.cache.recall.submit = count  # type: ignore[method-assign]
    for _ in range(3):
        dec.step(rows)
    assert len(submitted) == 6
    jobs = dec.cache._jobs
    assert set(jobs) == set(dec.cache.sparse_layers)
    sparse = dec.cache.sparse_layers
    cut = max(1, len(sparse) // 3)
    assert len({id(jobs[i]) for i in sparse[:cut]}) == 1
    assert len({id(jobs[i]) for i in sparse[cut:]}) == 1
    assert jobs[sparse[0]] is not jobs[sparse[-1]]
    for r in rows:
        dec.remove_request(r)
    assert not dec.cache._jobs and dec.cache.host.used_pages == 0


def test_first_layers_wait_only_the_first_job() -> None:
    """The next step's first sparse layer attends while the second job (the later layers)
    is still held on the worker; that layer waits it only when it reaches it."""
    dec = ReferenceDecoder(make_cfg(16, k=3, tau=None), num_layers=6, num_qo_heads=4,
                           num_kv_heads=2, max_len=320)
    rows = [dec.add_request(16 * 9), dec.add_request(16 * 12 + 5)]
    dec.step(rows)
    dec.cache.wait_jobs()  # the first step's jobs ran unheld
    sparse = dec.cache.sparse_layers
    later = sparse[max(1, len(sparse) // 3):]
    held, release = threading.Event(), threading.Event()
    run = cache_mod.run_step_job

    def holding(cache, layers, inp):  # type: ignore[no-untyped-def]
        if layers == later:
            held.set()
            assert release.wait(timeout=60), "the second job was never released"
        run(cache, layers, inp)

    seen: list[tuple[int, bool]] = []

    def on_layer(layer, *args):  # type: ignore[no-untyped-def]
        if layer in sparse:
            seen.append((layer, release.is_set()))
            if layer == sparse[0]:
                release.set()  # the first layer attended: let the second job finish

    cache_mod.run_step_job = holding  # type: ignore[assignment]
    try:
        dec.step(rows)  # submits the held jobs
        assert held.wait(timeout=60)
        dec.step(rows, on_layer=on_layer)
    finally:
        release.set()
        cache_mod.run_step_job = run  # type: ignore[assignment]
    assert seen[0] == (sparse[0], False)  # attended before the second job could finish
    for r in rows:
        dec.remove_request(r)
    dec.cache.close()


def test_job_wait_counts_the_engine_waiting_a_job() -> None:
    """``job_wait_ns`` (the ``sglang:freekv_job_wait_seconds`` metric) grows when a layer
    waits a job that is still running: the jobs are held until the engine is in the wait."""
    dec = ReferenceDecoder(make_cfg(16, k=3, tau=None), num_layers=4, num_qo_heads=4,
                           num_kv_heads=2, max_len=320)
    rows = [dec.add_request(16 * 9), dec.add_request(16 * 12 + 5)]
    dec.step(rows)
    dec.cache.wait_jobs()
    before = dec.cache.stats()["job_wait_ns"]
    waiting = threading.Event()
    submit = dec.cache.recall.submit

    def held_submit(fn):  # type: ignore[no-untyped-def]
        def held():  # type: ignore[no-untyped-def]
            assert waiting.wait(timeout=60), "the engine never waited the job"
            return fn()

        fut = submit(held)
        result = fut.result

        def waited_result(timeout=None):  # type: ignore[no-untyped-def]
            waiting.set()  # the engine is in the wait: let the job run
            return result(timeout)

        fut.result = waited_result  # type: ignore[method-assign]
        return fut

    dec.cache.recall.submit = held_submit  # type: ignore[method-assign]
    dec.step(rows)  # submits held jobs
    dec.step(rows)  # its first sparse layer waits one of them
    assert dec.cache.stats()["job_wait_ns"] > before
    for r in rows:
        dec.remove_request(r)
    dec.cache.close()


def test_speculative_job_config() -> None:
    assert FreeKVConfig().speculative_job_for("cpu") == "step"
    assert FreeKVConfig().speculative_job_for("cuda") == "layer"
    assert FreeKVConfig(speculative_job="layer").speculative_job_for("cpu") == "layer"
    with pytest.raises(FreeKVConfigError, match=r'speculative_job="batch": must be one of'):
        FreeKVConfig(speculative_job="batch")
    cfg = make_cfg(16, speculative_job="step")
    with pytest.raises(ValueError, match="CPU engines only"):
        FreeKVCache(cfg, num_layers=2, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                    dtype=torch.float32, device="cuda", max_reqs=1, max_pages_per_req=4,
                    num_host_pages=4, k_buffers=[], v_buffers=[])


def _drifting(limit: float, seed: int = 3) -> tuple[ReferenceDecoder, RuleChecker, list[int]]:
    p = 16
    cfg = make_cfg(p, k=3, tau=0.8, speculative_job="step", spec_drift_limit=limit)
    dec = ReferenceDecoder(cfg, num_layers=4, num_qo_heads=6, num_kv_heads=2,
                           max_len=24 * p, recall_group_blocks=4, seed=seed, q_noise=(1.0,))
    return dec, RuleChecker(dec), [dec.add_request(p * 11), dec.add_request(p * 9 + 1)]


def _run(dec: ReferenceDecoder, checker: RuleChecker, rows: list[int], steps: int
         ) -> list[list[int]]:
    """``steps`` decode steps under the selection rule; the job's layers before each."""
    seen = []
    for _ in range(steps):
        checker.job_layers = set(dec.cache.speculative_layers)
        seen.append(sorted(checker.job_layers))
        dec.step(rows, on_layer=checker)
        dec.cache.recall.wait_all()
    return seen


def test_drifting_layers_leave_the_step_job_and_select_with_q_t(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose queries drift (every check corrects a head) leaves the step job after a
    few steps; from then on it selects every head with q_t (RuleChecker: the synchronous
    rule for it), and the job serves only the other layers."""
    dec, checker, rows = _drifting(limit=0.3)
    submitted: list[list[int]] = []
    import sglang_freekv.cache as cache_mod

    orig = cache_mod.run_step_job

    def spy(cache, layers, inp):  # type: ignore[no-untyped-def]
        submitted.append(list(layers))
        return orig(cache, layers, inp)

    monkeypatch.setattr(cache_mod, "run_step_job", spy)
    seen = _run(dec, checker, rows, 12)
    sparse = dec.cache.sparse_layers
    assert seen[0] == sparse and seen[-1] == [], seen  # all in at first, all out at the end
    # each step's jobs (two parts, in layer order) serve exactly that step's job layers
    flat_jobs = [lid for part in submitted for lid in part]
    flat_seen = [lid for layers in seen[1:len(seen)] for lid in layers]
    assert submitted and flat_jobs == flat_seen[:len(flat_jobs)], (submitted, seen)
    assert checker.sparse_checks > 20
    assert dec.cache.stats()["speculative_layers"] == 0
    for r in rows:
        dec.remove_request(r)
    assert dec.cache.host.used_pages == 0
    dec.cache.close()


def test_a_layer_rejoins_the_job_when_its_queries_settle() -> None:
    """Out of the job, a layer's drift is still probed (every fourth step); once its queries
    stop drifting it rejoins and is served speculatively again."""
    dec, checker, rows = _drifting(limit=0.3)
    _run(dec, checker, rows, 10)
    assert dec.cache.speculative_layers == []
    dec.q_noise = (0.0,)  # the same query every step: no head drifts
    seen = _run(dec, checker, rows, 60)
    assert seen[-1] == dec.cache.sparse_layers, seen[-1]
    for r in rows:
        dec.remove_request(r)
    dec.cache.close()


def test_every_layer_stays_in_the_job_at_limit_one() -> None:
    dec, checker, rows = _drifting(limit=1.0)
    seen = _run(dec, checker, rows, 10)
    assert all(s == dec.cache.sparse_layers for s in seen)
    assert 0 < dec.cache.stats()["corrected_heads"]
    dec.cache.close()
