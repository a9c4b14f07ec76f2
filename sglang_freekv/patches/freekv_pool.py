"""FreeKV's KV pool and memory sizing for SGLang (thin adapters over ``sglang_freekv.sizing``
and ``sglang_freekv.serving``).

Changes (only when ``--kv-policy freekv`` is active in this process):
- ``KVCacheConfigurator._resolve_memory_pool_config`` (AROUND): SGLang's profiler measures
  the device bytes left for KV as usual (``_profile_available_bytes``); FreeKV spends them
  with :func:`sglang_freekv.sizing.plan_device_memory` (logical tokens bounded by the host
  tier, not by dense KV) and returns SGLang a pool config with that ``max_total_num_tokens``
  and ``max_running_requests``.
- ``KVCacheConfigurator._resolve_kv_pool_class`` (AROUND): for ``kind="mha"`` returns
  :class:`FreeKVTokenToKVPool` (dense layers full-size, sparse layers budget + staging rows).
- ``PrefillAdder.add_one_req`` (AROUND): stops filling a prefill batch before its tokens
  (prefixes included: they are read back into the scratch) overflow the prefill scratch.
- ``ScheduleBatch.check_decode_mem`` (AROUND): the next decode step must also find a host page
  for every request whose token opens one (after evicting radix-cache entries that hold host
  pages); otherwise it answers "no room" and SGLang retracts requests, as it does when its token
  pool runs out. The host tier can run out first: cached prefixes keep their partial last
  pages, and a request that matched a prefix in the middle of a page holds its own copy of it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from sglang_freekv.config import FreeKVConfig, FreeKVConfigError
from sglang_freekv.patches.server_args import policy_of
from sglang_freekv.serving import DeviceRows, FreeKVServing
from sglang_freekv.sizing import DeviceMemoryPlan, ModelShape, plan_device_memory

logger = logging.getLogger(__name__)

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_RESOLVE_CONFIG = f"{_CONFIGURATOR}._resolve_memory_pool_config"
_RESOLVE_CLASS = f"{_CONFIGURATOR}._resolve_kv_pool_class"
_ADMIT = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
_DECODE_MEM = "sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem"
TARGETS = (_RESOLVE_CONFIG, _RESOLVE_CLASS, _ADMIT, _DECODE_MEM)

# The plan of this process (one model runner per scheduler process) and its pool.
ACTIVE: dict[str, Any] = {"plan": None, "pool": None, "backend": None, "scheduler": None}


def check_dense_layers(cfg: FreeKVConfig, num_layers: int, model: str) -> None:
    """``dense_layers`` against the model's real layer count (the launcher can only check
    it when the model has a local config.json): one line and exit status 2, never a layer
    silently dropped."""
    try:
        cfg.validate_for_model(num_layers=num_layers, model=Path(model).name or model)
    except FreeKVConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _resolve_memory_pool_config(orig: Any, self: Any, pre_model_load_memory: int) -> Any:
    policy, cfg = policy_of()
    if policy != "freekv" or getattr(self, "is_draft_worker", False):
        return orig(self, pre_model_load_memory)
    assert cfg is not None and cfg.host_memory_gb is not None  # resolved by the launcher
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig
    from sglang.srt.runtime_context import get_parallel, get_schedule

    mc = self.model_config
    tp = get_parallel().attn_tp_size
    num_layers = self.layer_info.num_effective_layers
    check_dense_layers(cfg, num_layers, str(self.server_args.model_path))
    available = self._profile_available_bytes(pre_model_load_memory)
    dense = len(cfg.dense_layers)
    shape = ModelShape(
        num_layers=num_layers, num_dense_layers=dense,
        num_qo_heads=mc.get_num_attention_heads(tp), num_kv_heads=mc.get_num_kv_heads(tp),
        head_dim=mc.head_dim, elem_bytes=torch.empty((), dtype=self.kv_cache_dtype).element_size())
    # host tier bytes per token over every rank (each keeps this rank's head count), as the
    # launcher counted them when it resolved host_memory_gb
    per_token = shape.row_bytes * num_layers * tp
    plan = plan_device_memory(
        available_bytes=available, shape=shape, page_size=cfg.page_size, budget=cfg.budget,
        top_k=cfg.top_k, context_len=mc.context_len,
        host_bytes=int(cfg.host_memory_gb * (1 << 30)), host_bytes_per_token=per_token,
        max_total_tokens=get_schedule().max_total_tokens,
        max_running_requests=get_schedule().max_running_requests)
    ACTIVE["plan"] = plan
    logger.info("freekv: %s", plan.describe())
    return MemoryPoolConfig(max_total_num_tokens=plan.max_total_tokens,
                            max_running_requests=plan.max_running_requests,
                            mem_fraction_static=get_schedule().mem_fraction_static)


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
            plan: DeviceMemoryPlan | None = ACTIVE["plan"]
            if cfg is None or plan is None:
                raise RuntimeError("freekv: the KV pool was built without FreeKV's memory plan")
            self.freekv_config: FreeKVConfig = cfg
            self.freekv_plan = plan
            layer_num = kwargs["layer_num"]
            start = kwargs.get("start_layer") or 0
            self.dense_local = {i - start for i in cfg.dense_layers if 0 <= i - start < layer_num}
            # One budget chunk per running request (+1: a request finishing while the next
            # one starts within the same step).
            self.rows = DeviceRows(budget=cfg.budget, max_reqs=plan.max_running_requests + 1,
                                   page_size=cfg.page_size)
            super().__init__(size, *args, **kwargs)
            # The one-layer prefill scratch (NHD; a page of margin for page-aligned reads).
            shape = (plan.staging_rows + cfg.page_size, self.head_num, self.head_dim)
            self.prefill_k = torch.zeros(shape, dtype=self.store_dtype, device=self.device)
            self.prefill_v = torch.zeros(shape, dtype=self.store_dtype, device=self.device)
            self.scratch_layer: int | None = None  # a sparse layer whose prefill reads it
            self.serving: FreeKVServing | None = None
            ACTIVE["pool"] = self

        @property
        def staging_rows(self) -> int:
            """Tokens (prefixes included) one prefill forward may hold."""
            return self.freekv_plan.staging_rows

        def _get_key_buffer(self, layer_id: int) -> torch.Tensor:
            if layer_id == self.scratch_layer:
                return self.prefill_k
            return super()._get_key_buffer(layer_id)

        def _get_value_buffer(self, layer_id: int) -> torch.Tensor:
            if layer_id == self.scratch_layer:
                return self.prefill_v
            return super()._get_value_buffer(layer_id)

        def init_serving(self, *, num_qo_heads: int, req_rows: int,
                         keep_partial_pages: bool, evict: Any) -> FreeKVServing:
            """Create the rank's serving core (host tier, digests, recall) once."""
            if self.serving is not None:
                return self.serving
            cfg = self.freekv_config
            self.serving = FreeKVServing(
                cfg, self.rows, scratch_k=self.prefill_k, scratch_v=self.prefill_v,
                k_buffers=self.k_buffer, v_buffers=self.v_buffer,
                num_qo_heads=num_qo_heads, num_token_ids=self.size + self.page_size + 1,
                num_host_pages=self.freekv_plan.num_host_pages,
                max_pages_per_req=-(-(self.size + self.page_size) // cfg.page_size) + 1,
                max_req_rows=req_rows, keep_partial_pages=keep_partial_pages, evict=evict)
            host = self.serving.cache.host
            elem = self.k_buffer[0].element_size()
            row = 2 * self.head_num * self.head_dim * elem
            dense_rows = self.size + self.page_size
            logger.info(
                "freekv: host tier %.3f GiB (%d pages of %d tokens, %d KV heads; %s); device "
                "KV %.3f GiB sparse (%d rows: %d requests x budget %d) + prefill scratch of "
                "one layer %.3f GiB (%d tokens) + %.3f GiB for dense layers %s",
                host.total_bytes / 2**30, host.num_pages, cfg.page_size, self.head_num,
                f"pinned {host.pinned_bytes / 2**30:.3f} GiB" if host.pin_memory
                else "not pinned: no CUDA", row * self.rows.buffer_rows * (self.layer_num - len(
                    self.dense_local)) / 2**30, self.rows.buffer_rows, self.rows.max_reqs,
                cfg.budget, row * self.prefill_k.shape[0] / 2**30, self.staging_rows,
                row * dense_rows * len(self.dense_local) / 2**30,
                sorted(i + self.start_layer for i in self.dense_local))
            return self.serving

        def _create_buffers_normal(self) -> None:
            rows_full = self.size + self.page_size
            assert self.v_head_dim == self.head_dim
            shape = (self.head_num, self.head_dim)
            # The sparse layers' buffers are one allocation, so a CPU step job recalls the
            # blocks of every layer with one scatter (FreeKVRecallEngine.recall_layers).
            n_sparse = self.layer_num - len(self.dense_local)
            sparse = torch.zeros((n_sparse, 2, self.rows.buffer_rows, *shape),
                                 dtype=self.store_dtype, device=self.device)
            self.k_buffer, self.v_buffer = [], []
            j = 0
            for i in range(self.layer_num):
                if i in self.dense_local:
                    buf = torch.zeros((2, rows_full, *shape), dtype=self.store_dtype,
                                      device=self.device)
                else:
                    buf, j = sparse[j], j + 1
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
            # SGLang's generic write path: sparse layers have no row per logical id (the
            # FreeKV backend writes them itself): refuse, never write a wrong row.
            raise RuntimeError("freekv: a KV write to sparse layer "
                               f"{layer_id} through SGLang's generic path")

    _POOL_CLASSES[base] = FreeKVTokenToKVPool
    return FreeKVTokenToKVPool


def _add_one_req(orig: Any, self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """Admit a request into a prefill batch only while the batch's tokens (each request's
    prefix, read back from the host tier, plus what it extends this forward) fit FreeKV's
    one-layer prefill scratch; the first request always fits (the scratch holds one context).

    The requests already in the batch (a continuing chunked request included, which SGLang
    adds through ``add_chunked_req``) hold ``extend_end`` scratch rows each: prefix + chunk.
    """
    pool = ACTIVE.get("pool")
    if pool is None:
        return orig(self, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import AddReqResult

    prefix = int(req.prefix_len)
    extend = len(req.full_untruncated_fill_ids) - prefix
    chunk = getattr(self, "rem_chunk_tokens", None)
    need = prefix + (min(extend, chunk) if chunk else extend)
    staged = sum(int(r.extend_end) for r in self.can_run_list)
    if self.can_run_list and staged + need > pool.staging_rows:
        return AddReqResult.OTHER
    if not _host_pages_fit(self, req):
        return AddReqResult.OTHER
    return orig(self, req, *args, **kwargs)


def prompt_pages(prefix_len: int, total: int, page_size: int) -> int:
    """Host pages a request's prefill still writes: every page from its first page not
    wholly inside the prefix (shared or its own earlier chunks) to its last token."""
    return max(0, -(-total // page_size) - prefix_len // page_size)


def _pages_to_write(serving: Any, req: Any, page_size: int) -> int:
    """Upper bound of the host pages ``req``'s prefill still allocates: a chunked request
    continuing on its row writes from its first page past its own earlier chunks; any other
    request may share none of its matched prefix's pages (the plan shares only whole pages
    it finds in the host tier's token map), so all of its prompt counts."""
    total = len(req.full_untruncated_fill_ids)
    row = getattr(req, "req_pool_idx", None)
    if row is not None and row in serving.own_pages:
        return prompt_pages(int(req.prefix_len), total, page_size)
    return prompt_pages(0, total, page_size)


def _host_pages_fit(adder: Any, req: Any) -> bool:
    """The host tier holds the whole remaining prompt of the batch's requests and ``req``.

    SGLang's token pool is sized from the host tier but counts tokens, not pages: partial
    pages (one per request and per cached prefix) can leave the tier short while the pool
    still has room, and the prefill plan would then fail mid-batch. Cached prefixes are
    evicted first, with ``req``'s own matched prefix locked so it stays valid.
    """
    backend = ACTIVE.get("backend")
    if backend is None:
        return True
    serving = backend.serving
    p = serving.cfg.page_size
    need = sum(_pages_to_write(serving, r, p) for r in [*adder.can_run_list, req])
    host = serving.cache.host
    if need <= host.free_pages:
        return True
    node = getattr(req, "last_node", None)
    lock = adder._lock_node(node) if node is not None else contextlib.nullcontext()
    with lock:  # the matched prefix of req is not evictable while we make room
        serving.ensure_host_pages(need)
    return need <= host.free_pages


def pages_opened_next_decode(kv_lens: list[int], page_size: int) -> int:
    """Host pages the next decode step may open: a request whose next token starts a page
    (``kv_len % P == 0``), or the one after it (``P - 1``: with the overlap scheduler the batch
    is planned one step ahead of the committed lengths)."""
    return sum(1 for n in kv_lens if n % page_size in (0, page_size - 1))


def _check_decode_mem(orig: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    ok = orig(self, *args, **kwargs)
    backend = ACTIVE.get("backend")
    if not ok or backend is None:
        return ok
    selected = args[0] if args else kwargs.get("selected_indices")
    reqs = self.reqs if selected is None else [self.reqs[i] for i in selected]
    serving = backend.serving
    need = pages_opened_next_decode([int(r.kv.kv_committed_len) for r in reqs],
                                    serving.cfg.page_size)
    if need == 0:
        return ok
    serving.ensure_host_pages(need)  # evicts radix-cache entries holding host pages
    return serving.cache.host.free_pages >= need


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_ADMIT, _add_one_req, HookType.AROUND)
    HookRegistry.register(_DECODE_MEM, _check_decode_mem, HookType.AROUND)
    HookRegistry.register(_RESOLVE_CONFIG, _resolve_memory_pool_config, HookType.AROUND)
    HookRegistry.register(_RESOLVE_CLASS, _resolve_kv_pool_class, HookType.AROUND)
