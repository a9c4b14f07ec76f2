"""FreeKVCudaCheckPlatform: SGLang on a CUDA GPU without sgl_kernel (GPU serving check only).

Not part of the product. ``benchmarks/gpu_serve_check.sh`` runs the real SGLang 0.5.23 server
on the GPU check machine, where the 355 MiB ``sglang-kernel`` wheel cannot travel. This
out-of-tree platform (entry point ``sglang.srt.platforms`` -> ``freekv_cuda_check``, declared
by a dist-info that ``benchmarks/gpu_bundle/build.py`` writes into the bundle) keeps the
device ``cuda`` but, being out of tree, makes every fused op (RMSNorm, RoPE, SiluAndMul) run
``forward_native``, so no ``sgl_kernel`` kernel is reached; the ``sgl_kernel`` stub
(``benchmarks/gpu_bundle/stub``) satisfies the imports. Attention stays SGLang's own:
FlashInfer by default, ``--attention-backend triton`` for Triton.

It activates only when CUDA is available and ``FREEKV_GPU_CHECK=1``; it is selected by
auto-discovery, never with ``SGLANG_PLATFORM`` (that would skip the sglang-freekv general
plugin, which SGLang excludes for platform distributions not selected).

``FREEKV_GPU_CHECK_GRAPHS=1`` declares graph capture and hands SGLang its in-tree decode
graph runner (for a later graphs-on run); otherwise graphs are declared unsupported.
"""

from __future__ import annotations

import os
from typing import Any

ENTRY_POINT_NAME = "freekv_cuda_check"
PLATFORM_QUALNAME = "freekv_gpu_check.platform.FreeKVCudaCheckPlatform"
ENV_ENABLE = "FREEKV_GPU_CHECK"
ENV_GRAPHS = "FREEKV_GPU_CHECK_GRAPHS"


def activate() -> str | None:
    """Entry point ``sglang.srt.platforms``: the platform class path, or None to stay off."""
    if os.environ.get(ENV_ENABLE) != "1":
        return None
    import torch

    if not (torch.cuda.is_available() and torch.version.hip is None):
        return None
    return PLATFORM_QUALNAME


def graphs_enabled() -> bool:
    return os.environ.get(ENV_GRAPHS) == "1"


def describe() -> dict[str, Any]:
    """What the check platform changes, for the check's summary."""
    return {
        "platform": PLATFORM_QUALNAME,
        "dispatch": "forward_native for every fused op (out-of-tree platform)",
        "attention_default": "flashinfer",
        "sampling_backend": "pytorch",
        "graphs": graphs_enabled(),
    }
