"""One test per race of freekv-method.md §8 (items 5-9), with the interleaving forced.

Each test runs a speculative decode and checks the selection rule (b) / slot content (c) or
the attention output. The bad interleaving of each race is *forced* with events: a job is held
at its start until the main thread has done, after submitting it, the thing the race needs
(overwritten the q buffer, rewritten the flags, passed the wait or attended), two workers
meet at a barrier after their gathers, or an attention is held until the job went as far as
it can. So the protected code passes and the unprotected variant (the
test replaces the protecting method of the cache, or the recall worker, from outside) FAILS,
every run, with no sleeps. The per-layer job (the GPU design) is tested for every race; the
per-step job (the CPU default) for the races it has: 5 (attention fences), 6 (persistent q)
and 7 (the Future).
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable

import pytest
import torch

from sglang_freekv.kernels._common import ScratchBuffers
from sglang_freekv.reference import ReferenceDecoder

from .conftest import RuleChecker, make_cfg

WAIT_S = 60  # a gate that is never opened is a test bug: fail instead of hanging


class _SharedScratch(ScratchBuffers):
    """Scratch buffers shared by every thread (the unprotected variant of race 8 on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self._local = types.SimpleNamespace()  # type: ignore[assignment]


def _decoder(tau: float | None = None, job: str = "layer", **kw: object) -> ReferenceDecoder:
    cfg = make_cfg(16, k=3, tau=tau, speculative_job=job)
    return ReferenceDecoder(cfg, num_layers=3, num_qo_heads=4, num_kv_heads=2, max_len=400,
                            recall_group_blocks=2, seed=7, **kw)  # type: ignore[arg-type]


class KeyedGate:
    """Holds each speculative job at its start until the main thread has bumped the job's
    key at least once after the job was submitted (the count is taken on the main thread at
    submission, so the interleaving does not depend on when the worker gets to the job)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._counts: dict[object, int] = {}
        self._closed = False

    def bump(self, key: object) -> None:
        with self._cv:
            self._counts[key] = self._counts.get(key, 0) + 1
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def hold(self, key: object, since: int) -> None:
        with self._cv:
            if not self._cv.wait_for(
                    lambda: self._counts.get(key, 0) > since or self._closed, WAIT_S):
                raise TimeoutError(f"job of {key} was never let run")

    def count(self, key: object) -> int:
        with self._cv:
            return self._counts.get(key, 0)


def hold_jobs(dec: ReferenceDecoder, gate: KeyedGate,
              key_of: Callable[[int], object] = lambda layer: "job") -> None:
    """Wrap the cache's job submission from outside: a job submitted by ``after_attention``
    of layer ``l`` runs only after ``gate.bump(key_of(l))`` on the main thread."""
    cache = dec.cache
    submitting: list[object] = []
    after, submit = cache.after_attention, cache.recall.submit

    def after_keyed(layer: int, *args: object, **kwargs: object) -> None:
        submitting.append(key_of(layer))
        try:
            after(layer, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            submitting.pop()

    def submit_held(fn: Callable[[], object]) -> object:
        key = submitting[-1]
        since = gate.count(key)
        return submit(lambda: (gate.hold(key, since), fn())[1])

    cache.after_attention = after_keyed  # type: ignore[method-assign]
    cache.recall.submit = submit_held  # type: ignore[method-assign]


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
    elif race == 8:  # two workers instead of one ordered worker, CPU staging not per thread
        eng = cache.recall
        eng.wait_all()
        eng._executor.shutdown(wait=True)
        eng._executor = eng._new_executor(2)
        eng._scratch = _SharedScratch()
    elif race == 9:  # read the shared flags buffer later instead of a snapshot
        cache._job_head_mask = lambda step, pick: (None, step.flags)  # type: ignore[method-assign]
    elif race == 10:  # the plan aliases the engine's row / length tensors (no copies)
        cache._plan_inputs = lambda rows, lens, rows_c, lens_c: (  # type: ignore[method-assign]
            rows.to(cache.device, torch.int64), lens.to(cache.device, torch.int64),
            rows_c.to("cpu", torch.int64), lens_c.to("cpu", torch.int64))


def _run(dec: ReferenceDecoder, steps: int, *, late: bool = False, check: bool = True,
         on_layer: Callable[..., None] | None = None,
         closing: KeyedGate | None = None) -> None:
    rows = [dec.add_request(n) for n in (150, 183, 230)]
    checker = RuleChecker(dec) if check else None

    def layer_cb(*args: object) -> None:
        if checker is not None:  # checked before on_layer may let a held job run
            checker(*args)  # type: ignore[arg-type]
        if on_layer is not None:
            on_layer(*args)

    try:
        for s in range(steps):
            out = dec.step(rows, on_layer=layer_cb, late_attention=late)
            if late:
                for layer, (o, lo) in enumerate(zip(out.outputs, out.late)):
                    assert torch.equal(o, lo), f"step {s} layer {layer}: slots changed " \
                                               "under a running attention"
    finally:
        if closing is not None:
            closing.close()
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
    """(5) The speculative scatter must not overwrite slots a running attention reads: the
    late attention reads the slots only once the job waits its fence or has finished."""
    dec = _decoder(job=job)
    if unsafe:
        _unprotect(dec, 5)
        with pytest.raises(AssertionError, match="under a running attention"):
            _run(dec, 8, late=True, check=False)
    else:
        _run(dec, 8, late=True, check=False)


@pytest.mark.parametrize("unsafe,job", [(False, "layer"), (True, "layer"), (False, "step")],
                         ids=["protected-layer", "unprotected-layer", "protected-step"])
def test_race6_selection_reads_persistent_q(unsafe: bool, job: str) -> None:
    """(6) The job selects with the persistent last_q, not the engine's reused q buffer: the
    job starts only after the engine wrote the next layer's q into that buffer (the step job
    has no unsafe mode: it only ever reads last_q)."""
    dec = _decoder(reuse_q_buffer=True, job=job)
    gate = KeyedGate()
    hold_jobs(dec, gate)
    dec.on_q_write = lambda: gate.bump("job")
    if unsafe:
        _unprotect(dec, 6)
        with pytest.raises(AssertionError):
            _run(dec, 10, closing=gate)
    else:
        _run(dec, 10, closing=gate)


@pytest.mark.parametrize("job", ["layer", "step"])
@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race7_wait_job_future_before_event(unsafe: bool, job: str) -> None:
    """(7) before_attention waits the job (Future, then event): each job starts only once
    the main thread waits its Future (protected) or, in the next step, has attended the
    job's layer without waiting (unprotected)."""
    dec = _decoder(job=job)
    cache = dec.cache
    gate = KeyedGate()
    key_of = (lambda layer: layer) if job == "layer" else (lambda layer: "step")
    hold_jobs(dec, gate, key_of)
    if unsafe:
        _unprotect(dec, 7)
    else:
        wait_job = cache._wait_job

        def waiting(layer: int) -> None:
            if layer in cache._jobs:
                gate.bump(key_of(layer))  # about to wait the Future: let the job run
            wait_job(layer)

        cache._wait_job = waiting  # type: ignore[method-assign]

    def attended(layer: int, *args: object) -> None:
        if layer in cache.sparse_layers:
            gate.bump(key_of(layer))  # attended this layer: let its job run

    if unsafe:
        with pytest.raises(AssertionError):
            _run(dec, 10, on_layer=attended, closing=gate)  # type: ignore[arg-type]
    else:
        _run(dec, 10, on_layer=attended, closing=gate)  # type: ignore[arg-type]


@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race8_layers_do_not_share_staging(unsafe: bool) -> None:
    """(8) Two layers' jobs in flight: each scatters its own layer's data. With two workers
    both jobs gather into the shared staging buffers before either scatters (a barrier of
    one party per worker)."""
    dec = _decoder()
    if unsafe:
        _unprotect(dec, 8)
    workers = 2 if unsafe else 1
    barrier = threading.Barrier(workers, timeout=2)
    first = threading.local()

    def checkpoint(point: str) -> None:
        if not threading.current_thread().name.startswith("freekv-recall"):
            return  # correction recalls on the main thread take no part
        if point == "job_start":
            first.gather = True
        elif point == "gathered" and getattr(first, "gather", False):
            first.gather = False  # each job meets the other worker at its first gather
            try:
                barrier.wait()
            except threading.BrokenBarrierError:  # a lone job (its partner recalls nothing)
                barrier.reset()

    dec.cache.recall._checkpoint = checkpoint  # type: ignore[method-assign]
    if unsafe:
        with pytest.raises(AssertionError):
            _run(dec, 10)
    else:
        _run(dec, 10)


@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race9_flags_snapshot_per_job(unsafe: bool) -> None:
    """(9) The job's head mask is a snapshot: the job starts only after the next layer's
    before_attention rewrote the shared flags buffer."""
    # sigma 0.5 => cos ~ tau: about half the heads corrected, differently per layer.
    dec = _decoder(tau=0.8, q_noise=(0.5,))
    cache = dec.cache
    gate = KeyedGate()
    hold_jobs(dec, gate)
    before = cache.before_attention

    def before_then_bump(layer: int, plan: object, q: torch.Tensor) -> None:
        before(layer, plan, q)  # type: ignore[arg-type]
        gate.bump("job")  # the shared flags buffer now holds this layer's flags

    cache.before_attention = before_then_bump  # type: ignore[method-assign]
    if unsafe:
        _unprotect(dec, 9)
        with pytest.raises(AssertionError):
            _run(dec, 12, closing=gate)
    else:
        _run(dec, 12, closing=gate)


@pytest.mark.parametrize("job", ["layer", "step"])
@pytest.mark.parametrize("unsafe", [False, True], ids=["protected", "unprotected"])
def test_race10_plan_owns_the_engines_batch_tensors(unsafe: bool, job: str) -> None:
    """(10) The engine rewrites its batch tensors (request rows, seq_lens) for its next
    forward while a speculative job of the last decode step may still be queued: in the
    server the next forward's rows replaced a decoding request's, and the job selected and
    recalled for the wrong row (the request's slots no longer held what its residency said;
    the long-document program's key branch answered a wrong pass key). Forced order: each job
    starts only after the engine's tensors given to ``plan_decode`` were overwritten (with an
    unused row and another length); the slots and selections are then checked next step."""
    dec = _decoder(job=job)
    cache = dec.cache
    gate = KeyedGate()
    hold_jobs(dec, gate)
    given: list[torch.Tensor] = []
    plan_decode = cache.plan_decode

    def planning(req_rows: torch.Tensor, seq_lens: torch.Tensor,
                 seq_lens_cpu: torch.Tensor | None = None,
                 req_rows_cpu: torch.Tensor | None = None) -> object:
        given[:] = [t for t in (req_rows, seq_lens, seq_lens_cpu, req_rows_cpu)
                    if t is not None]
        return plan_decode(req_rows, seq_lens, seq_lens_cpu, req_rows_cpu)

    cache.plan_decode = planning  # type: ignore[method-assign]
    step = dec.step

    def step_then_next_forward(*args: object, **kwargs: object) -> object:
        out = step(*args, **kwargs)  # type: ignore[arg-type]
        unused = dec.max_reqs - 1
        for t in given:  # the engine's next batch in the same tensors
            t.fill_(unused if t.max() < dec.max_reqs else 7)
        gate.bump("job")
        return out

    dec.step = step_then_next_forward  # type: ignore[method-assign]
    if unsafe:
        _unprotect(dec, 10)
        # the selection rule (per-layer jobs) or the slots (step job: "K slot != host page")
        with pytest.raises(AssertionError, match="!="):
            _run(dec, 8, closing=gate)
    else:
        _run(dec, 8, closing=gate)

