"""Process hooks that make FreeKVCpuPlatform serve with tensor parallelism (gloo).

Active only when :func:`sglang_freekv.platform.cpu_platform_wanted` is true. Changes:
- ``sglang.srt.layers.linear._is_cpu`` and ``sglang.srt.layers.parameter._is_cpu`` are set
  to True so the weight loader pads heads that do not divide by the TP size (SGLang pads the
  config itself for ``device == "cpu"``; these module flags gate the matching weight paths and
  are computed from the in-tree ``is_cpu()``, which is False for an out-of-tree platform).
- ``sglang.srt.utils.numa_utils.init_threads_binding`` (AROUND): with more ranks than NUMA
  nodes and no ``SGLANG_CPU_OMP_THREADS_BIND``, split this process's allowed CPUs evenly
  between the ranks instead of asserting.
- ``sglang.srt.distributed.bootstrap._init_cpu_threads_env`` (REPLACE): pin the rank to its
  CPUs with ``os.sched_setaffinity`` and size torch's thread pool to them (the in-tree
  version needs sgl_kernel's CPU ops). Without pinning, two TP2 ranks fight over the same
  cores and decode ~4x slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from sglang_freekv.platform import cpu_platform_wanted

logger = logging.getLogger(__name__)

_NUMA = "sglang.srt.utils.numa_utils.init_threads_binding"
_THREADS = "sglang.srt.distributed.bootstrap._init_cpu_threads_env"


def parse_cpu_list(spec: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def split_cpus(cpus: list[int], world_size: int, index: int) -> list[int]:
    """The ``index``-th of ``world_size`` near-equal contiguous shares of ``cpus``."""
    cpus = sorted(cpus)
    if world_size <= 0 or not 0 <= index < world_size:
        raise ValueError(f"rank index {index} out of range for world size {world_size}")
    if world_size > len(cpus):
        # More ranks than cores: share cores round-robin (slow but it serves).
        return [cpus[index % len(cpus)]]
    base, extra = divmod(len(cpus), world_size)
    start = index * base + min(index, extra)
    return cpus[start : start + base + (1 if index < extra else 0)]


def _threads_binding(orig: Callable[..., Any], *, numa_index: int, world_size: int) -> Any:
    if os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        return orig(numa_index=numa_index, world_size=world_size)
    from sglang.srt.utils.common import get_cpu_ids_by_node

    if world_size <= len(get_cpu_ids_by_node()):
        return orig(numa_index=numa_index, world_size=world_size)
    allowed = sorted(os.sched_getaffinity(0))
    share = split_cpus(allowed, world_size, numa_index % world_size)
    return ",".join(map(str, share))


def _init_cpu_threads_env(
    *, local_omp_cpuid: str | list[int] | None, dist_init_method: str | None = None
) -> None:
    import torch

    if local_omp_cpuid is None:
        return
    cpus = (
        parse_cpu_list(local_omp_cpuid)
        if isinstance(local_omp_cpuid, str)
        else list(local_omp_cpuid)
    )
    allowed = os.sched_getaffinity(0)
    cpus = [c for c in cpus if c in allowed] or sorted(allowed)
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    logger.info("freekv cpu platform: pinned rank to CPUs %s (%d threads)", cpus, len(cpus))


def register() -> None:
    if not cpu_platform_wanted():
        return
    import sglang.srt.layers.linear as linear
    import sglang.srt.layers.parameter as parameter
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    linear._is_cpu = True
    parameter._is_cpu = True
    HookRegistry.register(_NUMA, _threads_binding, HookType.AROUND)
    HookRegistry.register(_THREADS, _init_cpu_threads_env, HookType.REPLACE)
