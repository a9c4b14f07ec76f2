"""A stand-in for ``sgl_kernel`` on the GPU check machine (GPU serving check only).

The real ``sglang-kernel`` wheel (355 MiB) cannot travel to the GPU check machine, but SGLang
0.5.23 imports it wherever ``sglang.srt.utils.is_cuda()`` is true (``is_cuda()`` ignores the
platform). This package satisfies those imports. What SGLang calls under the check platform
(``freekv_gpu_check``, where every fused op runs ``forward_native``) behaves:

* ``is_arch_support_pdl()`` -> ``False`` (no programmatic dependent launch),
* ``weak_ref_tensor(t)`` -> ``t`` (a strong reference; only CUDA-graph bookkeeping uses it).

Every other name resolves to a placeholder whose call raises :class:`SglKernelStubError`
naming the function, so a path that really needs an ``sgl_kernel`` kernel fails with one
clear line instead of an obscure import or attribute error. Any ``sgl_kernel.<sub>`` submodule
is a stub module of the same kind. Never install this next to the real ``sgl_kernel``.

``_ACCESSED`` records every placeholder name that was looked up (imports bind names without
calling them), ``_CALLED`` every name that was called; ``FREEKV_STUB_LOG=1`` prints each
first call to stderr.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any

__version__ = "0.0.0+freekv.stub"
IS_FREEKV_STUB = True

_ACCESSED: set[str] = set()
_CALLED: set[str] = set()


class SglKernelStubError(RuntimeError):
    """Raised when a placeholder of the sgl_kernel stub is called."""


def _note_call(qualname: str) -> None:
    if qualname not in _CALLED:
        _CALLED.add(qualname)
        if os.environ.get("FREEKV_STUB_LOG") == "1":
            print(f"sgl_kernel stub: {qualname} called", file=sys.stderr, flush=True)


def _is_arch_support_pdl(*args: Any, **kwargs: Any) -> bool:
    _note_call("is_arch_support_pdl")
    return False


def _weak_ref_tensor(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    _note_call("weak_ref_tensor")
    return tensor


# Functions SGLang calls on the check path: they return what a GPU without the real kernels
# would make SGLang do anyway.
BEHAVING: dict[str, Any] = {
    "is_arch_support_pdl": _is_arch_support_pdl,
    "weak_ref_tensor": _weak_ref_tensor,
}


class _Placeholder:
    """A name imported from the stub: calling it raises; attributes are placeholders too."""

    __slots__ = ("_qualname",)

    def __init__(self, qualname: str) -> None:
        object.__setattr__(self, "_qualname", qualname)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _note_call(self._qualname)
        raise SglKernelStubError(
            f"sgl_kernel stub: {self._qualname}() was called, but the GPU serving check "
            "carries only a stub of sgl_kernel (benchmarks/gpu_bundle/stub). This path needs "
            "the real sglang-kernel; make the check platform take a torch-native path instead."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _lookup(f"{self._qualname}.{name}")

    def __repr__(self) -> str:
        return f"<sgl_kernel stub placeholder {self._qualname}>"

    def __bool__(self) -> bool:
        return True


def _lookup(qualname: str) -> Any:
    short = qualname.rsplit(".", 1)[-1]
    if short in BEHAVING:
        return BEHAVING[short]
    _ACCESSED.add(qualname)
    return _Placeholder(qualname)


class _StubModule(types.ModuleType):
    """``sgl_kernel`` and its submodules: unknown attributes become placeholders."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        prefix = self.__name__[len("sgl_kernel") :].lstrip(".")
        return _lookup(f"{prefix}.{name}" if prefix else name)


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``sgl_kernel.<anything>`` import a stub module."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []  # a package, so deeper submodules import too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        parent, _, child = module.__name__.rpartition(".")
        setattr(sys.modules[parent], child, module)


sys.modules[__name__].__class__ = _StubModule
if not any(isinstance(f, _SubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SubmoduleFinder())

is_arch_support_pdl = _is_arch_support_pdl
weak_ref_tensor = _weak_ref_tensor
