"""HostSyncGuard: fail on any host-synchronising tensor operation inside a ``with`` block.

Run on CPU, the GPU decode step is the same Python code the GPU runs, so every operation that
would make the host wait for a CUDA device can be caught by name: reading a value
(``.item()``, ``.tolist()``, ``bool()``/``int()``/``float()`` of a tensor, ``.numpy()``),
copying to the host (``.cpu()``, ``.to("cpu")`` or any ``.to(device=...)``, which from host
data is a pageable copy), data-dependent shapes (``nonzero``, ``unique``, ``masked_select``,
boolean-mask indexing) and building tensors from host data (``torch.tensor``,
``torch.as_tensor``). Calls made by Triton's interpreter (which runs the kernels on CPU
through numpy) are the kernels themselves, not the step, and are allowed.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSync", "HostSyncGuard"]

_BANNED = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.argwhere,
    torch.Tensor.unique, torch.unique, torch.masked_select, torch.Tensor.masked_select,
    torch.tensor, torch.as_tensor,
}


class HostSync(AssertionError):
    """A host-synchronising operation ran inside a :class:`HostSyncGuard` block."""


def _from_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/triton/" in name:
            return True
        frame = frame.f_back
    return False


def _bool_index(args: tuple[Any, ...]) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncGuard(TorchFunctionMode):
    """``with HostSyncGuard(): step()`` raises :class:`HostSync` naming the operation."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0  # torch calls seen (so a test can tell the guard was active)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        self.checked += 1
        bad = func in _BANNED
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _bool_index(args):
            bad = True
        if func is torch.Tensor.to:
            dev = kwargs.get("device")
            dev = dev if dev is not None else next(
                (a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            bad = dev is not None
        if bad and not _from_triton():
            name = getattr(func, "__qualname__", None) or repr(func)
            raise HostSync(f"host-synchronising operation inside the decode step: {name}")
        return func(*args, **kwargs)
