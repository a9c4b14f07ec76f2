"""sglang-freekv: FreeKV speculative KV-cache retrieval for SGLang, as a plugin.

The public surface is small and cheap to import (no torch, no sglang):
:class:`FreeKVConfig` and :func:`apply_all` (the ``sglang.srt.plugins`` entry point).
The core (``layout``, ``kernels``, ``pool_host``, ``retrieval``, ``recall``, ``cache``)
needs torch (+ triton on GPUs) and never imports sglang.
"""

from __future__ import annotations

from sglang_freekv.config import FreeKVConfig, FreeKVConfigError

__all__ = ["FreeKVConfig", "FreeKVConfigError", "apply_all", "__version__"]
__version__ = "0.1.0"


def apply_all() -> None:
    """Register the SGLang hooks (see :mod:`sglang_freekv.patches`)."""
    from sglang_freekv.patches import apply_all as _apply_all

    _apply_all()
