"""FreeKVCpuPlatform: an out-of-tree SGLang platform that serves on a CPU without sgl_kernel.

SGLang's in-tree CPU engine needs a CPU build of ``sgl_kernel`` that PyPI does not ship.
This platform (entry point ``sglang.srt.platforms`` -> :func:`activate`) is out-of-tree, so
every fused op runs its ``forward_native`` torch path, attention defaults to ``torch_native``
and TP runs over gloo. It activates only when no accelerator is present, or when selected
with ``SGLANG_PLATFORM=freekv_cpu``; on a CUDA machine it stays out of the way.

The TP-specific process hooks (head padding flags, per-rank thread pinning) live in
``sglang_freekv.patches.cpu_platform``; they run from the general plugin in every process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

ENTRY_POINT_NAME = "freekv_cpu"
PLATFORM_QUALNAME = "sglang_freekv.platform.FreeKVCpuPlatform"
# Default cap on the CPU KV pool: uncapped, SGLang sizes the pool at ~70% of free RAM
# (14.5 GB and ~30 s of allocation on our 24 GB machines) for a 135M model.
ENV_MAX_TOKENS = "SGLANG_FREEKV_CPU_MAX_TOKENS"
DEFAULT_MAX_TOTAL_TOKENS = 65536
# Simulated device memory (GiB): the platform then reports a device of this size, and
# SGLang's own profiler sizes weights, KV pools and activations out of it as on a GPU.
ENV_DEVICE_GB = "SGLANG_FREEKV_CPU_DEVICE_GB"

logger = logging.getLogger(__name__)


def _accelerator_present() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mps"):
        mod = getattr(torch, name, None)
        try:
            if mod is not None and mod.is_available():
                return True
        except Exception:  # noqa: BLE001 - a broken backend module is "not present"
            continue
    return False


def cpu_platform_wanted() -> bool:
    """True when this process should run SGLang on :class:`FreeKVCpuPlatform`."""
    selected = os.environ.get("SGLANG_PLATFORM", "")
    if selected:
        return selected == ENTRY_POINT_NAME
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
        return False  # the user asked for SGLang's in-tree CPU engine
    return not _accelerator_present()


def activate() -> str | None:
    """Entry point ``sglang.srt.platforms``: the platform class path, or None to stay off."""
    return PLATFORM_QUALNAME if cpu_platform_wanted() else None


def simulated_device_bytes() -> int | None:
    """Bytes of the simulated device (``SGLANG_FREEKV_CPU_DEVICE_GB``), or None when unset.
    Raises ValueError naming the variable for a value that is not a positive number."""
    raw = os.environ.get(ENV_DEVICE_GB)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_DEVICE_GB}={raw!r}: must be a number of GiB") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{ENV_DEVICE_GB}={raw!r}: must be > 0")
    return int(value * (1 << 30))


def max_total_tokens_default() -> int | None:
    """The CPU platform's KV pool cap: ``SGLANG_FREEKV_CPU_MAX_TOKENS``, else 65536 tokens,
    else (with a simulated device memory) None: the profiler sizes the pool."""
    raw = os.environ.get(ENV_MAX_TOKENS)
    if raw is None:
        return None if simulated_device_bytes() is not None else DEFAULT_MAX_TOTAL_TOKENS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_MAX_TOKENS}={raw!r}: must be an integer") from None
    if value <= 0:
        raise ValueError(f"{ENV_MAX_TOKENS}={raw!r}: must be > 0")
    return value


def _build_platform_class() -> type:
    # SGLang is imported lazily: this module must import without sglang (the
    # entry point function above is cheap and the core never needs the class).
    from sglang.srt.platforms.cpu import CpuDeviceMixin
    from sglang.srt.platforms.device_mixin import PlatformEnum
    from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

    class _FreeKVCpuPlatform(CpuDeviceMixin, SRTPlatform):
        """CPU serving without sgl_kernel: native torch ops, torch_native attention, gloo."""

        _enum = PlatformEnum.OOT
        device_name = "cpu"
        device_type = "cpu"
        capabilities = PlatformCapabilities()  # no triton, graphs or pynccl on CPU

        def get_device(self, device_id: int = 0) -> Any:
            # SGLang calls .split(":") on this when --device is omitted.
            return "cpu"

        def get_dispatch_key_name(self) -> str:
            return "native"

        def get_default_attention_backend(self) -> str:
            return "torch_native"

        def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
            return "torch_native"

        def is_pin_memory_available(self, device: Any = None) -> bool:
            return False

        def apply_server_args_defaults(self, server_args: Any) -> None:
            if getattr(server_args, "device", None) in (None, "", "auto"):
                server_args.device = "cpu"
            if getattr(server_args, "max_total_tokens", None) is None:
                server_args.max_total_tokens = max_total_tokens_default()

        def get_device_total_memory(self, device_id: int = 0) -> int:
            total = simulated_device_bytes()
            return total if total is not None else super().get_device_total_memory(device_id)

        def get_current_memory_usage(self, device: Any = None) -> float:
            if simulated_device_bytes() is None:
                return super().get_current_memory_usage(device)
            from sglang_freekv.patches.cpu_platform import simulated_device_used

            return float(simulated_device_used())

        def get_available_memory(self, device_id: int = 0) -> tuple[int, int]:
            total = simulated_device_bytes()
            if total is None:
                return super().get_available_memory(device_id)
            return total - int(self.get_current_memory_usage()), total

        def get_torch_distributed_backend_str(self) -> str:
            return "gloo"

    _FreeKVCpuPlatform.__name__ = "FreeKVCpuPlatform"
    _FreeKVCpuPlatform.__qualname__ = "FreeKVCpuPlatform"
    _FreeKVCpuPlatform.__module__ = __name__
    return _FreeKVCpuPlatform


def __getattr__(name: str) -> Any:
    # PEP 562: `FreeKVCpuPlatform` is built on first access so importing this module
    # does not import sglang.
    if name == "FreeKVCpuPlatform":
        cls = _build_platform_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
