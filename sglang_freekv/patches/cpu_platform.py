"""Process hooks that make FreeKVCpuPlatform serve with tensor parallelism (gloo).

Active only when :func:`sglang_freekv.platform.cpu_platform_wanted` is true. Changes:
- ``sglang.srt.layers.linear._is_cpu`` and ``sglang.srt.layers.parameter._is_cpu`` are set
  to True so the weight loader pads heads that do not divide by the TP size (SGLang pads the
  config itself for ``device == "cpu"``; these module flags gate the matching weight paths and
  are computed from the in-tree ``is_cpu()``, which is False for an out-of-tree platform).
- ``sglang.srt.utils.numa_utils.init_threads_binding`` (AROUND): with more ranks on this node
  (``world_size / nnodes``) than NUMA nodes and no ``SGLANG_CPU_OMP_THREADS_BIND``, split this
  process's allowed CPUs evenly between this node's ranks instead of asserting.
- ``sglang.srt.distributed.bootstrap._init_cpu_threads_env`` (REPLACE): pin the rank to its
  CPUs with ``os.sched_setaffinity`` and size torch's thread pool to them (the in-tree
  version needs sgl_kernel's CPU ops). Without pinning, two TP2 ranks fight over the same
  cores and decode ~4x slower.
- With ``SGLANG_FREEKV_CPU_DEVICE_GB`` set (a simulated device memory, for sizing tests):
  ``sglang.srt.utils.common.get_available_gpu_memory`` (AROUND) answers for ``device ==
  "cpu"`` with that size minus what this process holds "on the device" (the model's weights,
  the KV and request pools, FreeKV's device tables), exactly as ``cuda`` answers with
  ``mem_get_info``; ``ModelRunner.load_model`` (BEFORE) remembers the runner to count them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from sglang_freekv.platform import cpu_platform_wanted, simulated_device_bytes

logger = logging.getLogger(__name__)

_NUMA = "sglang.srt.utils.numa_utils.init_threads_binding"
_THREADS = "sglang.srt.distributed.bootstrap._init_cpu_threads_env"
_AVAILABLE = "sglang.srt.utils.common.get_available_gpu_memory"
_LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
TARGETS = (_NUMA, _THREADS, _AVAILABLE, _LOAD_MODEL)

_RUNNERS: list[Any] = []  # model runners of this process (simulated device accounting)


def _tensor_bytes(tensors: Any, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def simulated_device_used() -> int:
    """Bytes this process holds on the simulated device: weights, KV and request pools, and
    FreeKV's device tables (the host tier is host memory and is not counted)."""
    seen: set[int] = set()
    total = 0
    for runner in _RUNNERS:
        model = getattr(runner, "model", None)
        if model is not None:
            total += _tensor_bytes(list(model.parameters()) + list(model.buffers()), seen)
        pool = getattr(runner, "token_to_kv_pool", None)
        for name in ("k_buffer", "v_buffer"):
            total += _tensor_bytes(getattr(pool, name, None) or [], seen)
        req = getattr(getattr(runner, "req_to_token_pool", None), "req_to_token", None)
        total += _tensor_bytes([req], seen)
        serving = getattr(pool, "serving", None)
        if serving is not None:
            total += _tensor_bytes(serving.cache.device_tensors() + [serving.scratch_k, serving.scratch_v], seen)
    return total


def _available_gpu_memory(orig: Callable[..., Any], device: Any, gpu_id: Any,
                          distributed: bool = False, empty_cache: bool = True,
                          cpu_group: Any = None) -> float:
    from sglang_freekv.platform import simulated_device_bytes

    total = simulated_device_bytes()
    if total is None or device != "cpu":
        return orig(device, gpu_id, distributed=distributed, empty_cache=empty_cache,
                    cpu_group=cpu_group)
    free = torch.tensor(float(total - simulated_device_used()), dtype=torch.float32)
    if distributed:
        torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN, group=cpu_group)
    return float(free.item()) / (1 << 30)


def _remember_runner(self: Any, *args: Any, **kwargs: Any) -> None:
    if self not in _RUNNERS:
        _RUNNERS.append(self)
    return None


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

    # Ranks on this node: SGLang passes the global world size; with --nnodes each node
    # runs world_size / nnodes of them (numa_index is the rank's local device id).
    try:
        from sglang.srt.runtime_context import get_server_args

        nnodes = max(1, int(getattr(get_server_args(), "nnodes", 1) or 1))
    except Exception:  # noqa: BLE001 - no published record: a single node
        nnodes = 1
    local = max(1, world_size // nnodes)
    if local <= len(get_cpu_ids_by_node()):
        return orig(numa_index=numa_index, world_size=local)
    allowed = sorted(os.sched_getaffinity(0))
    share = split_cpus(allowed, local, numa_index % local)
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


def active() -> bool:
    """Whether this process runs on FreeKVCpuPlatform (these hooks then apply)."""
    return cpu_platform_wanted()


def active_targets() -> tuple[str, ...]:
    """The SGLang symbols :func:`register` patches in this process."""
    flags = ("sglang.srt.layers.linear._is_cpu", "sglang.srt.layers.parameter._is_cpu")
    if simulated_device_bytes() is not None:
        return (*flags, _NUMA, _THREADS, _AVAILABLE, _LOAD_MODEL)
    return (*flags, _NUMA, _THREADS)


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
    if simulated_device_bytes() is not None:
        HookRegistry.register(_AVAILABLE, _available_gpu_memory, HookType.AROUND)
        HookRegistry.register(_LOAD_MODEL, _remember_runner, HookType.BEFORE)
