"""FreeKV's KV pool for SGLang: full-size dense layers, budget-size sparse layers.

Changes (only when ``--kv-policy freekv`` is active in this process):
- ``KVCacheConfigurator._derive_pool_sizes`` (AFTER): remembers ``max_running_requests``.
- ``KVCacheConfigurator._resolve_kv_pool_class`` (AROUND): for ``kind="mha"`` returns
  :class:`FreeKVTokenToKVPool`.
- ``PrefillAdder.add_one_req`` (AROUND): stops filling a prefill batch before its tokens
  (cached prefixes included, they are staged too) overflow the prefill staging rows.

Memory model. SGLang's allocator hands out *logical* token ids (``req_to_token``) over the
whole context as usual; the logical capacity (``max_total_tokens``) is capped to the host tier
by the launcher. Dense layers (``dense_layers``) keep full-size buffers indexed by logical id.
Sparse layers have ``device_rows`` rows only: ``max_running_requests x budget`` rows of budget
slots plus a prefill staging area. While a request prefills, its tokens' logical ids map to
staging rows (``loc_map``); at its first decode step the backend commits it to FreeKV (host
tier + digests + budget slots) and the staging rows are returned.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sglang_freekv.cache import FreeKVCache
from sglang_freekv.config import FreeKVConfig
from sglang_freekv.patches.server_args import policy_of

logger = logging.getLogger(__name__)

_SIZES = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._derive_pool_sizes"
_RESOLVE = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class"
_ADMIT = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"

_state: dict[str, Any] = {"max_running_requests": None}
# Device rows for prompts being prefilled (kept until each request's first decode step).
STAGING_TOKENS = 8192
# The pool of this process (one model runner per scheduler process).
ACTIVE: dict[str, Any] = {"pool": None}


def _staging_tokens() -> int:
    """Rows for one prefill batch: the larger of STAGING_TOKENS, SGLang's prefill-token cap
    and the context length (chunked prefill is off, so a long prompt prefills whole)."""
    from sglang.srt.runtime_context import get_server_args

    args = get_server_args()
    want = [STAGING_TOKENS, getattr(args, "max_prefill_tokens", 0) or 0,
            getattr(args, "context_length", 0) or 0]
    model_path = getattr(args, "model_path", None)
    if model_path:
        from pathlib import Path
        import json

        cfg_file = Path(model_path) / "config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            want.append(int((cfg.get("text_config") or cfg).get("max_position_embeddings") or 0))
    return max(want) + 64


class StagingRows:
    """Free mask over device rows ``[start, end)``, handed out one token row at a time."""

    def __init__(self, start: int, end: int, device: torch.device) -> None:
        self.start = start
        self.free_mask = torch.ones(end - start, dtype=torch.bool, device=device)

    @property
    def used(self) -> int:
        return int((~self.free_mask).sum())

    def alloc(self, n: int) -> torch.Tensor | None:
        """``[n]`` int64 rows, or None when fewer than ``n`` are free."""
        idx = torch.nonzero(self.free_mask).flatten()[:n]
        if idx.numel() < n:
            return None
        self.free_mask[idx] = False
        return idx + self.start

    def free(self, rows: torch.Tensor) -> None:
        self.free_mask[rows - self.start] = True


class RowAllocator:
    """Free list of device rows in ``[start, end)``, handed out in pages of ``page`` rows."""

    def __init__(self, start: int, end: int, page: int) -> None:
        self.page = page
        self.free_pages = list(range(start, end, page))[::-1]  # pop() gives the lowest
        self.total = len(self.free_pages)

    @property
    def used(self) -> int:
        return self.total - len(self.free_pages)

    def alloc_pages(self, n: int) -> list[int] | None:
        if n > len(self.free_pages):
            return None
        return [self.free_pages.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_pages.extend(pages)


def _derive_pool_sizes(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    _state["max_running_requests"] = int(result.max_running_requests)
    return result


def _resolve_kv_pool_class(orig: Any, self: Any, *, kind: str, default: type) -> type:
    cls = orig(self, kind=kind, default=default)
    policy, _ = policy_of()
    if policy != "freekv" or kind != "mha":
        return cls
    return pool_class(cls)


_POOL_CLASSES: dict[type, type] = {}


def pool_class(base: type) -> type:
    """FreeKVTokenToKVPool derived from SGLang's MHA pool class ``base``."""
    if base in _POOL_CLASSES:
        return _POOL_CLASSES[base]

    class FreeKVTokenToKVPool(base):  # type: ignore[misc, valid-type]
        """MHA pool whose sparse layers hold budget slots + prefill staging only."""

        def __init__(self, size: int, *args: Any, **kwargs: Any) -> None:
            _, cfg = policy_of()
            assert cfg is not None
            self.freekv_config: FreeKVConfig = cfg
            layer_num = kwargs["layer_num"]
            start = kwargs.get("start_layer") or 0
            self.dense_local = {i - start for i in cfg.dense_layers if 0 <= i - start < layer_num}
            p = cfg.page_size
            self.max_reqs = int(_state["max_running_requests"] or 64) + 1
            # Staging holds the prompts being prefilled (all their chunks) until their first
            # decode step: one full context plus a margin, in pages.
            self.staging_rows = -(-min(size + p, _staging_tokens()) // p) * p
            self.budget_rows = self.max_reqs * cfg.budget
            self.device_rows = self.budget_rows + self.staging_rows
            super().__init__(size, *args, **kwargs)
            dev = self.k_buffer[0].device
            # loc_map: logical id -> staging row of a prompt token not yet committed (-1).
            self.loc_map = torch.full((size + self.page_size,), -1, dtype=torch.int64,
                                      device=dev)
            self.slots = RowAllocator(0, self.budget_rows, cfg.budget)
            self.staging = StagingRows(self.budget_rows, self.device_rows, dev)
            self.freekv: FreeKVCache | None = None
            ACTIVE["pool"] = self

        def init_freekv(self, num_qo_heads: int) -> FreeKVCache:
            """Create the rank's FreeKVCache (host tier, digests, recall) once."""
            if self.freekv is not None:
                return self.freekv
            cfg, p, size = self.freekv_config, self.freekv_config.page_size, self.size
            dev = self.k_buffer[0].device
            num_host_pages = -(-size // p) + self.max_reqs
            self.freekv = FreeKVCache(
                cfg,
                num_layers=self.layer_num,
                num_qo_heads=num_qo_heads,
                num_kv_heads=self.head_num,
                head_dim=self.head_dim,
                dtype=self.dtype,
                device=dev,
                max_reqs=self.max_reqs + 1,
                max_pages_per_req=-(-size // p) + 1,
                num_host_pages=num_host_pages,
                k_buffers=self.k_buffer,
                v_buffers=self.v_buffer,
            )
            host_gb = self.freekv.host.kv.numel() * self.freekv.host.kv.element_size() / 2**30
            dense_gb = sum(b.numel() * b.element_size() * 2 for i, b in
                           enumerate(self.k_buffer) if i in self.dense_local) / 2**30
            sparse_gb = sum(b.numel() * b.element_size() * 2 for i, b in
                            enumerate(self.k_buffer) if i not in self.dense_local) / 2**30
            logger.info(
                "freekv: host tier %.2f GiB (%d pages of %d tokens, %d KV heads); device KV "
                "%.2f GiB sparse (%d rows: %d requests x budget %d + %d staging) + %.2f GiB "
                "for dense layers %s",
                host_gb, num_host_pages, p, self.head_num, sparse_gb, self.device_rows,
                self.max_reqs, cfg.budget, self.staging_rows, dense_gb,
                sorted(i + self.start_layer for i in self.dense_local),
            )
            return self.freekv

        def _create_buffers_normal(self) -> None:
            rows_full = self.size + self.page_size
            self.k_buffer, self.v_buffer = [], []
            for i in range(self.layer_num):
                rows = rows_full if i in self.dense_local else self.device_rows
                buf = torch.zeros((2, rows, self.head_num, self.head_dim),
                                  dtype=self.store_dtype, device=self.device)
                assert self.v_head_dim == self.head_dim
                self.k_buffer.append(buf[0])
                self.v_buffer.append(buf[1])

        def _build_kv_buffer_descs(self) -> tuple:  # type: ignore[override]
            return ()  # PD transfer of a FreeKV pool is not supported

        def is_sparse_layer(self, layer_id: int) -> bool:
            return (layer_id - self.start_layer) not in self.dense_local

        def set_kv_buffer(self, layer: Any, loc_info: Any, cache_k: torch.Tensor,
                          cache_v: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            layer_id = kwargs.get("layer_id_override")
            layer_id = layer_id if layer_id is not None else layer.layer_id
            if not self.is_sparse_layer(layer_id):
                return super().set_kv_buffer(layer, loc_info, cache_k, cache_v, *args, **kwargs)
            from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

            loc, _, _ = unwrap_write_loc(loc_info)
            rows = self.loc_map[loc]
            local = layer_id - self.start_layer
            self.k_buffer[local][rows] = cache_k.to(self.store_dtype)
            self.v_buffer[local][rows] = cache_v.to(self.store_dtype)

    _POOL_CLASSES[base] = FreeKVTokenToKVPool
    return FreeKVTokenToKVPool


def _add_one_req(orig: Any, self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """Admit a request into a prefill batch only while the batch's staging rows (its
    extended tokens plus its cached prefixes, loaded from the host tier) fit FreeKV's
    prefill staging area; the first request always fits (staging >= one context)."""
    pool = ACTIVE.get("pool")
    if pool is None:
        return orig(self, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import AddReqResult

    need = len(req.full_untruncated_fill_ids)  # prefix + extend tokens, all staged
    staged = getattr(self, "_freekv_staged", 0)
    if self.can_run_list and staged + need > pool.staging_rows:
        return AddReqResult.OTHER
    before = len(self.can_run_list)
    result = orig(self, req, *args, **kwargs)
    if len(self.can_run_list) > before:
        self._freekv_staged = staged + need
    return result


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_ADMIT, _add_one_req, HookType.AROUND)
    HookRegistry.register(_SIZES, _derive_pool_sizes, HookType.AFTER)
    HookRegistry.register(_RESOLVE, _resolve_kv_pool_class, HookType.AROUND)
