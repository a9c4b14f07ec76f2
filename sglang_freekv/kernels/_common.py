"""Shared launch helpers for the FreeKV Triton kernels: sizes, boundary checks, routing.

Every public launcher in ``sglang_freekv.kernels`` validates its tensors with
:func:`check_tensor` (metadata only: shape, dtype, device, strides; never a host sync),
then asks :func:`resolve_impl` whether to run the Triton kernel or the PyTorch reference.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "IMPLS",
    "next_power_of_2",
    "check_tensor",
    "check_same_device",
    "check_positive_int",
    "use_triton",
    "resolve_impl",
    "resolve_impl_cpu",
    "wide_int_view",
    "ScratchBuffers",
]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
IMPLS: tuple[str, ...] = ("triton", "ref")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``); used for ``BLOCK_*`` sizes."""
    n = int(n)
    if n <= 1:
        return 1
    return 1 << (n - 1).bit_length()


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(
    name: str,
    t: object,
    shape: Sequence[int | None] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | str | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    """Validate one public tensor argument; metadata only (never ``.item()``).

    ``shape`` entries of ``None`` are wildcards; the rank must match exactly.
    ``dtype`` is one dtype or a sequence of accepted dtypes. ``device`` compares the
    device *type* and, when given with an index, the index too.
    Raises :class:`ValueError` whose message names ``name``, e.g.
    ``Invalid shape of page_loc: expected [7], got [6]``. Returns ``t``.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"Invalid type of {name}: expected torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        got = tuple(t.shape)
        ok = len(got) == len(shape) and all(e is None or e == g for e, g in zip(shape, got))
        if not ok:
            raise ValueError(
                f"Invalid shape of {name}: expected {_fmt_shape(shape)}, got {_fmt_shape(got)}"
            )
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            exp = " or ".join(str(d) for d in allowed)
            raise ValueError(f"Invalid dtype of {name}: expected {exp}, got {t.dtype}")
    if device is not None:
        dev = torch.device(device)
        if t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index):
            raise ValueError(f"Invalid device of {name}: expected {dev}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"Invalid layout of {name}: expected a contiguous tensor")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"Invalid layout of {name}: expected stride 1 in the last dim, got {t.stride(-1)}"
        )
    return t


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ValueError if any tensor in ``others`` is on a different device than ``ref``."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"Invalid device of {name}: expected {ref.device} (same as {ref_name}), "
                f"got {t.device}"
            )


def check_positive_int(name: str, value: object) -> int:
    """Raise ValueError unless ``value`` is a Python int >= 1 (bool rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid value of {name}: expected a positive int, got {value!r}")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` can go through a Triton kernel: CUDA tensors, or any tensor while
    Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, used by the tests)."""
    return bool(t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def resolve_impl(impl: str | None, t: torch.Tensor) -> str:
    """Pick ``"triton"`` or ``"ref"``: an explicit ``impl`` wins, else :func:`use_triton`."""
    if impl is None:
        return "triton" if use_triton(t) else "ref"
    if impl not in IMPLS:
        raise ValueError(
            f"Invalid value of impl: expected one of {list(IMPLS)} or None, got {impl!r}"
        )
    if impl == "triton" and not use_triton(t):
        raise ValueError(
            "Invalid value of impl: 'triton' needs CUDA tensors or TRITON_INTERPRET=1, "
            f"got tensors on {t.device}"
        )
    return impl


def resolve_impl_cpu(impl: str | None, t: torch.Tensor) -> str:
    """For kernels that also have a batched PyTorch serving path for CPU engines:
    ``"cpu"`` on request, or for ``impl=None`` where Triton cannot run; else
    :func:`resolve_impl` (``"triton"`` | ``"ref"``)."""
    if impl == "cpu":
        return "cpu"
    path = resolve_impl(impl, t)
    return "cpu" if impl is None and path == "ref" else path


def wide_int_view(t: torch.Tensor) -> torch.Tensor:
    """Bit-identical view of ``t`` (last dim contiguous) with the widest integer element that
    divides its last dim in bytes (``t`` itself if none does): CPU index_select / index_put /
    index_copy move whole rows ~3-15x faster as int64 than as float or bf16 elements."""
    row_bytes = t.shape[-1] * t.element_size()
    for dt in (torch.int64, torch.int32, torch.int16):
        if row_bytes % dt.itemsize == 0 and t.element_size() <= dt.itemsize:
            return t.view(dt)
    return t


class ScratchBuffers:
    """Grow-only scratch tensors of a CPU path, one set per thread (the engine's thread and
    the recall worker each get their own, so a job never overwrites a correction's scratch).

    Why: a CPU path's large temporaries (hundreds of KB to MBs) come from glibc ``mmap`` and
    go back to the OS on free, so every call page-faults them in again; in a VM a fault is
    expensive (scoring a 6.5K-token step job: ~8 ms with fresh temporaries, ~2.5 ms once
    none faults). A view of a buffer is valid until the same thread asks for the same
    ``name`` again: callers keep none past their own return. Requests above ``max_bytes``
    get a fresh tensor (no large buffer held for a rare call).
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._local = threading.local()

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        """An uninitialized ``[*shape]`` tensor of ``dtype`` on ``device``."""
        n = math.prod(shape)
        if n * dtype.itemsize > self.max_bytes:
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor]
        bufs = self._local.__dict__.setdefault("bufs", {})
        key = (name, dtype, torch.device(device))
        buf = bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            bufs[key] = buf
        return buf[:n].view(tuple(shape))
