"""Intra-op threads for FreeKV's own host work on CPU engines.

FreeKV's per-layer work (correction flags, page selection, residency diff, recall copies)
is a string of small tensor ops. On a CPU engine torch runs each on an OpenMP team sized for
the model's matmuls; for ops this small the team costs more than it saves, and while the
recall worker thread holds one core, every team of the main thread waits on its slowest
member (2-core machine, another thread busy: gathering one layer's digests for a 6.5K-token
request takes 17 us with one thread and 30 us with two; the scoring matmul 34 us and 55 us).
The end-to-end effect on decode speed was within this machine's noise and is not claimed.

:func:`single_intra_op_thread` runs a block with one intra-op thread and puts the caller's
count back; :func:`pin_worker_threads` gives the recall worker threads one thread each.
``torch.set_num_threads`` sets the calling thread's OpenMP count *and* torch's process
default (read by threads that start later), so both helpers restore the default.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["single_intra_op_thread", "pin_worker_threads"]


@contextlib.contextmanager
def single_intra_op_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with one intra-op thread (no-op when ``enabled`` is False or the
    caller already runs one). About 0.5 us per use."""
    keep = torch.get_num_threads() if enabled else 1
    if keep == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(keep)


def pin_worker_threads(executor: ThreadPoolExecutor, n_workers: int) -> None:
    """Give each of the ``n_workers`` threads of a fresh ``executor`` one intra-op thread.

    Call from the thread whose count is the process default (the engine's thread): each
    worker's ``set_num_threads(1)`` also lowers the process default, which the caller then
    puts back with its own (unchanged) count.
    """
    keep = torch.get_num_threads()
    barrier = threading.Barrier(n_workers)

    def pin() -> None:
        # torch sizes a thread's team lazily from the process default at the thread's first
        # parallel op (or count query); do that first, or it would undo the pin later.
        torch.get_num_threads()
        torch.set_num_threads(1)
        barrier.wait()  # each submit lands on its own worker thread

    for fut in [executor.submit(pin) for _ in range(n_workers)]:
        fut.result()  # SYNC: once at start-up
    torch.set_num_threads(keep)
