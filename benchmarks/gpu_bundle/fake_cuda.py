"""A fake CUDA device for import-path dry runs on a machine without a GPU (H200-shaped).

``install()`` makes ``torch.cuda`` report one sm_90 device before SGLang is imported, so the
``if is_cuda(): from sgl_kernel import ...`` branches, FlashInfer's arch checks and the
platform discovery take the paths they take on the GPU check machine. Nothing here launches
a kernel: creating a CUDA tensor still fails, which is what a dry run wants (it stops before
the GPU is needed).
"""

from __future__ import annotations

import os
import types
from typing import Any

NAME = "NVIDIA H200 (fake)"
CAPABILITY = (9, 0)
TOTAL_MEMORY = 143_771 * 1024 * 1024


def _properties(device: Any = None) -> Any:
    return types.SimpleNamespace(
        name=NAME,
        major=CAPABILITY[0],
        minor=CAPABILITY[1],
        total_memory=TOTAL_MEMORY,
        multi_processor_count=132,
        L2_cache_size=60 * 1024 * 1024,
        uuid="GPU-00000000-0000-0000-0000-000000000000",
        is_integrated=False,
        warp_size=32,
        max_threads_per_multi_processor=2048,
        shared_memory_per_block_optin=227 * 1024,
        regs_per_multiprocessor=65536,
        gcnArchName="",
    )


def install() -> None:
    """Patch ``torch.cuda`` in this process to report one H200-like device."""
    import torch

    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.get_device_capability = lambda device=None: CAPABILITY
    cuda.get_device_name = lambda device=None: NAME
    cuda.get_device_properties = _properties
    cuda.mem_get_info = lambda device=None: (TOTAL_MEMORY - 2**30, TOTAL_MEMORY)
    cuda.is_bf16_supported = lambda *a, **k: True
    cuda.get_arch_list = lambda: ["sm_90"]
    cuda.is_initialized = lambda: True
    if torch.version.cuda is None:
        torch.version.cuda = "13.0"
    # FlashInfer's JIT context reads the arch list from here when no device is queried.
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
