"""ScratchBuffers: grow-only, per thread, fresh tensors above the cap."""

from __future__ import annotations

import threading

import torch

from sglang_freekv.kernels._common import ScratchBuffers

CPU = torch.device("cpu")


def test_reuses_and_grows() -> None:
    s = ScratchBuffers()
    a = s.get("x", (4, 8), torch.float32, CPU)
    assert a.shape == (4, 8) and a.dtype == torch.float32
    b = s.get("x", (2, 8), torch.float32, CPU)  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
    c = s.get("x", (64, 8), torch.float32, CPU)  # larger: a new buffer, kept from now on
    assert c.shape == (64, 8)
    assert s.get("x", (3, 5), torch.float32, CPU).data_ptr() == c.data_ptr()


def test_names_and_dtypes_are_separate() -> None:
    s = ScratchBuffers()
    a = s.get("x", (16,), torch.float32, CPU)
    assert s.get("y", (16,), torch.float32, CPU).data_ptr() != a.data_ptr()
    assert s.get("x", (16,), torch.bfloat16, CPU).data_ptr() != a.data_ptr()


def test_threads_get_their_own() -> None:
    s = ScratchBuffers()
    main = s.get("x", (16,), torch.float32, CPU).data_ptr()
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(s.get("x", (16,), torch.float32,
                                                          CPU).data_ptr()))
    t.start()
    t.join()
    assert seen and seen[0] != main
    assert s.get("x", (16,), torch.float32, CPU).data_ptr() == main


def test_above_the_cap_is_fresh() -> None:
    s = ScratchBuffers(max_bytes=64)
    a = s.get("x", (32,), torch.float32, CPU)  # 128 bytes > 64
    b = s.get("x", (32,), torch.float32, CPU)  # a still alive: other memory
    assert a.data_ptr() != b.data_ptr()
    small = s.get("x", (8,), torch.float32, CPU)  # under the cap: held from now on
    assert s.get("x", (8,), torch.float32, CPU).data_ptr() == small.data_ptr()
