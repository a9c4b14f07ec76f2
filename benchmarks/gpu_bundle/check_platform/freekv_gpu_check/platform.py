"""The check platform class (see the package docstring). Imports sglang; loaded by SGLang only."""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.platforms.cuda import CudaDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

from freekv_gpu_check import graphs_enabled

logger = logging.getLogger(__name__)


def _decode_graph_runner(model_runner: Any) -> Any:
    # The in-tree choice for a CUDA device (what SGLang builds when no platform has an opinion).
    return model_runner._decode_cuda_graph_runner_cls(model_runner)


class FreeKVCudaCheckPlatform(CudaDeviceMixin, SRTPlatform):
    """CUDA device, out-of-tree dispatch: native fused ops, SGLang's attention backends."""

    _enum = PlatformEnum.OOT
    device_name = "cuda"
    device_type = "cuda"
    capabilities = PlatformCapabilities(
        supports_triton=True,
        graph_capture=graphs_enabled(),
        piecewise_graph=False,
        hicache_device_kernels=False,  # those are sgl_kernel ops
        supports_pynccl=False,  # TP1 only in the check
    )

    def get_dispatch_key_name(self) -> str:
        return "native"

    def get_default_attention_backend(self) -> str:
        return "flashinfer"

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "flashinfer"

    def get_group_coordinator_device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank)

    def get_graph_runner_cls(self) -> Any:
        return _decode_graph_runner if graphs_enabled() else None

    def apply_server_args_defaults(self, server_args: Any) -> None:
        if getattr(server_args, "device", None) in (None, "", "auto"):
            server_args.device = "cuda"
        # The default sampler on CUDA calls sgl_kernel's top_k_renorm_prob.
        if getattr(server_args, "sampling_backend", None) is None:
            server_args.sampling_backend = "pytorch"

    def init_backend(self) -> None:
        logger.info(
            "freekv_gpu_check: CUDA without sgl_kernel (native fused ops, graphs %s)",
            "on" if graphs_enabled() else "off",
        )
