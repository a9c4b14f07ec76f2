"""Intra-op thread counts of FreeKV's host work (sglang_freekv.threads)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from sglang_freekv.threads import pin_worker_threads, single_intra_op_thread


def _count_in_new_thread() -> int:
    box: list[int] = []
    th = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
    th.start()
    th.join()
    return box[0]


def test_single_intra_op_thread_restores_the_count() -> None:
    keep = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_intra_op_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with single_intra_op_thread(enabled=False):
            assert torch.get_num_threads() == 2
        assert _count_in_new_thread() == 2  # the process default is back too
    finally:
        torch.set_num_threads(keep)


def test_pin_worker_threads() -> None:
    keep = torch.get_num_threads()
    torch.set_num_threads(2)
    ex = ThreadPoolExecutor(max_workers=3)
    try:
        pin_worker_threads(ex, 3)
        counts = {ex.submit(torch.get_num_threads).result() for _ in range(6)}
        assert counts == {1}
        assert torch.get_num_threads() == 2
        assert _count_in_new_thread() == 2
    finally:
        ex.shutdown(wait=True)
        torch.set_num_threads(keep)
