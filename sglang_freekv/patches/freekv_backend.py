"""FreeKVAttnBackend: the ``freekv`` attention backend, a wrapper of SGLang's own backends.

The backend of the platform does the attention: FlashInfer on CUDA (default), SGLang's
Triton backend with ``--attention-backend triton``, torch_native on CPU. Two instances are
built: ``dense`` serves the dense layers (``dense_layers``) and prefill of those layers over
SGLang's own ``req_to_token`` exactly as stock SGLang; ``sparse`` serves the other layers and
reads through FreeKV's tables instead of ``req_to_token``: in prefill the scratch rows of
each position (``ExtendStep.table``), in decode the budget rows of each request
(``plan.kv_table``, lengths ``plan.kv_lens``). Its batch view has request rows ``0..bs-1``
(one table row per batch position). In prefill the sparse instance reads the pool's one-layer
prefill scratch (the pool hands it out for the layer being prefilled). No attention kernel of
FreeKV's own runs.

The logic lives in :class:`sglang_freekv.serving.FreeKVServing`; this module only adapts
SGLang's calls. Hooks (SGLang's HookRegistry):
- ``ReqToTokenPool.free_rows`` (BEFORE): a request's row is freed (finish, abort,
  retraction): return its host pages, budget slots and staging rows.
- token allocators' ``free`` / ``free_segment`` / ``clear`` (BEFORE): logical ids freed, so
  host pages only the radix cache held can return.
- ``UnifiedRadixCache.checkpoint`` / ``RadixCache.checkpoint`` (AFTER): a running request's
  ids were deduplicated against the cache.
- ``DecodeCudaGraphRunner._copy_replay_inputs`` (BEFORE): remembers the batch being replayed,
  whose host copies (request rows, seq_lens) the out-of-graph plan reads (the replay view
  the backend gets carries device buffers only).

CUDA graphs (SGLang's graph interface): ``init_cuda_graph_state`` sizes both instances and the
device step's lanes; ``init_forward_metadata_out_graph`` is the host side of a step (the
plan: host pages, lane buffers, budget table; the sparse instance's own out-of-graph prep
over it); the layers' FreeKV work (``FreeKVServing.begin/end_decode_layer`` on the device
step) is captured with the forward. Metrics are pushed out of the graph, at the next plan and
on every release.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from sglang_freekv.patches import freekv_metrics
from sglang_freekv.patches.freekv_pool import ACTIVE
from sglang_freekv.serving import ExtendStep
from sglang_freekv.plan import FreeKVDecodePlan

logger = logging.getLogger(__name__)

_FREE_ROWS = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows"
# SGLang 0.5.23 builds a UnifiedRadixCache for MHA models (RadixCache for other setups).
_TREES = ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache",
          "sglang.srt.mem_cache.radix_cache.RadixCache")
_TOKEN_FREE = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free"
_TOKEN_CLEAR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.clear"
_PAGED_FREE = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.free"
_PAGED_SEGMENT = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.free_segment"
_PAGED_CLEAR = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.clear"
_REGISTRY = "sglang.srt.layers.attention.attention_registry"
_REPLAY = ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
           "._copy_replay_inputs")
TARGETS = (_FREE_ROWS, _REPLAY, *(f"{t}.checkpoint" for t in _TREES), _TOKEN_FREE, _TOKEN_CLEAR,
           _PAGED_FREE, _PAGED_SEGMENT, _PAGED_CLEAR, f"{_REGISTRY}.ATTENTION_BACKENDS",
           f"{_REGISTRY}.register_attention_backend",
           "sglang.srt.mem_cache.kv_index_translator.KVIndexTranslator",
           "sglang.srt.arg_groups.choices.add_attention_backend_choices")

# Wrapped backends: the inner backend under FreeKV per platform / user choice.
INNER_BACKENDS = ("flashinfer", "triton", "torch_native")


class _TablePool:
    """What torch_native reads as ``req_to_token_pool``: one table, rows = batch positions."""

    def __init__(self, table: torch.Tensor) -> None:
        self.req_to_token = table


def _evictor(scheduler_ref: dict[str, Any]) -> Any:
    """``evict(num_tokens) -> evicted``: frees radix-cache entries (host pages they hold)."""

    def evict(num_tokens: int) -> int:
        tree = getattr(scheduler_ref.get("scheduler"), "tree_cache", None)
        if tree is None:
            return 0
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        return int(tree.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted)

    return evict


def create_backend(runner: Any) -> Any:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
    from sglang.srt.runtime_context import get_parallel

    from sglang_freekv.config import inner_backend_for

    pool = runner.token_to_kv_pool
    if not hasattr(pool, "init_serving"):
        raise RuntimeError("the freekv attention backend needs --kv-policy freekv")
    inner = inner_backend_for(str(runner.device).split(":")[0])
    if inner not in INNER_BACKENDS or inner not in ATTENTION_BACKENDS:
        raise RuntimeError(f"freekv: cannot wrap attention backend {inner!r} "
                           f"(supported: {', '.join(INNER_BACKENDS)})")

    class FreeKVAttnBackend(AttentionBackend):
        """See the module docstring."""

        def __init__(self) -> None:
            super().__init__()
            self.inner_name = inner
            self.dense = ATTENTION_BACKENDS[inner](runner)
            self.sparse = ATTENTION_BACKENDS[inner](runner)
            self.kv_index_translator = runner.kv_index_translator
            # The sparse instance reads rows from FreeKV's tables: FlashInfer and Triton
            # through their translator (a plain pool's translator passes req_to_token rows
            # through), torch_native through its req_to_token_pool.
            self._table_reader = KVIndexTranslator(
                req_to_token=runner.req_to_token_pool.req_to_token,
                token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
                token_to_kv_pool=pool, page_size=1, device=runner.device)
            self.sparse.kv_index_translator = self._table_reader
            self.pool = pool
            self.device = torch.device(runner.device)
            self.req_to_token = runner.req_to_token_pool.req_to_token
            tp = get_parallel().attn_tp_size
            self.serving = pool.init_serving(
                num_qo_heads=runner.model_config.get_num_attention_heads(tp),
                req_rows=runner.req_to_token_pool.req_to_token.shape[0],
                keep_partial_pages=not getattr(runner.server_args, "disable_radix_cache",
                                               True),
                evict=_evictor(ACTIVE))
            self.last_layer = pool.start_layer + pool.layer_num - 1
            self.metrics = freekv_metrics.FreeKVMetrics.create(get_parallel().tp_rank)
            self.view: Any = None  # the sparse instance's forward batch of this forward
            self.extend: ExtendStep | None = None
            self.plan: FreeKVDecodePlan | None = None
            ACTIVE["backend"] = self
            logger.info("freekv: attention over budget pages by SGLang's %s backend", inner)

        # ------------------------------------------------------------ metadata
        def _sparse_view(self, fb: Any, table: torch.Tensor, **fields: Any) -> Any:
            """A copy of ``fb`` whose request rows are batch positions of ``table``."""
            view = copy.copy(fb)
            view.req_pool_indices = torch.arange(fb.batch_size, dtype=fb.req_pool_indices.dtype,
                                                 device=fb.req_pool_indices.device)
            for name, value in fields.items():
                setattr(view, name, value)
            self._table_reader.req_to_token = table
            self.sparse.req_to_token_pool = _TablePool(table)
            return view

        def init_forward_metadata(self, forward_batch: Any) -> None:
            self.init_forward_metadata_out_graph(forward_batch)
            self.init_forward_metadata_in_graph(forward_batch)

        def init_forward_metadata_out_graph(self, forward_batch: Any,
                                            in_capture: bool = False) -> None:
            """Host side of a forward (never captured): FreeKV's plan, then both instances'
            own out-of-graph prep."""
            fb = forward_batch
            self.dense.init_forward_metadata_out_graph(fb, in_capture)
            self.metrics.update(self.serving)  # counters of the previous forward
            self.extend = self.plan = self.view = None
            mode = fb.forward_mode
            if mode.is_idle():
                return
            if mode.is_decode():
                rows_c, lens_c = _host_rows_and_lens(fb)
                lanes = int(fb.batch_size)
                real = int((rows_c != 0).sum()) if lanes else 0  # graph padding: row 0
                plan = self.serving.plan_decode(
                    fb.req_pool_indices[:real], fb.seq_lens[:real], rows_c[:real],
                    lens_c[:real], fb.out_cache_loc[:real], self.req_to_token, lanes=lanes)
                self.plan = plan
                lens_cpu = plan.kv_lens_cpu[:lanes].to(torch.int64)
                self.view = self._sparse_view(
                    fb, plan.kv_table[:lanes], seq_lens=plan.kv_lens[:lanes].to(
                        fb.seq_lens.dtype), seq_lens_cpu=lens_cpu,
                    seq_lens_sum=int(lens_cpu.sum()))
            elif mode.is_extend():
                prefix = list(fb.extend_prefix_lens_cpu or [0] * fb.batch_size)
                rows_c, lens_c = _host_rows_and_lens(fb)
                step = self.serving.plan_extend(rows_c.tolist(), lens_c.tolist(), prefix,
                                                fb.out_cache_loc, self.req_to_token)
                self.extend = step
                self.view = self._sparse_view(fb, step.table)
            else:
                raise RuntimeError(f"freekv: forward mode {mode} is not supported")
            self.sparse.init_forward_metadata_out_graph(self.view, in_capture)

        def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
            self.dense.init_forward_metadata_in_graph(forward_batch)
            if self.view is not None:
                self.sparse.init_forward_metadata_in_graph(self.view)

        def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
            self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
            budget = self.serving.cfg.budget
            if self.inner_name == "flashinfer":  # budget tables, not whole contexts
                buf = torch.zeros(max_bs * budget, dtype=torch.int32, device=self.device)
                self.sparse.init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf=buf)
            else:
                self.sparse.init_cuda_graph_state(max_bs, max_num_tokens)
            self.serving.ensure_lanes(max_bs)

        def get_cuda_graph_seq_len_fill_value(self) -> int:
            return int(self.dense.get_cuda_graph_seq_len_fill_value())

        # ------------------------------------------------------------ forward
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True,  # type: ignore[no-untyped-def]
                           **kwargs: Any):
            lid = layer.layer_id
            if not self.pool.is_sparse_layer(lid):
                o = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache,
                                              **kwargs)
            else:
                step = self.extend
                assert step is not None, "freekv: extend without a plan"
                local = lid - self.pool.start_layer
                self.serving.begin_extend_layer(
                    local, step, k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim),
                    v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim))
                self.pool.scratch_layer = lid  # the stock backend reads the scratch
                try:
                    o = self.sparse.forward_extend(q, k, v, layer, self.view, False, **kwargs)
                finally:
                    self.pool.scratch_layer = None
                self.serving.end_extend_layer(local, step)
            if lid == self.last_layer:
                # Every layer wrote this forward's K/V through to the host tier.
                assert self.extend is not None
                self.serving.commit_extend(self.extend)
            return o

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True,  # type: ignore[no-untyped-def]
                           **kwargs: Any):
            lid = layer.layer_id
            if not self.pool.is_sparse_layer(lid):
                out = self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache,
                                                **kwargs)
            else:
                plan = self.plan
                assert plan is not None, "freekv: decode without a plan"
                local = lid - self.pool.start_layer
                hq, d = layer.tp_q_head_num, layer.qk_head_dim
                q3 = q.reshape(-1, hq, d)  # [bs, Hq, D]
                self.serving.begin_decode_layer(
                    local, plan, q3, k.reshape(-1, layer.tp_k_head_num, d),
                    v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim))
                out = self.sparse.forward_decode(q, k, v, layer, self.view, False, **kwargs)
                self.serving.end_decode_layer(local, plan, q3)
            return out

        def support_triton(self) -> bool:
            return bool(self.dense.support_triton())

    return FreeKVAttnBackend()


def _host_rows_and_lens(fb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Request rows and seq_lens of a forward on the host: the batch's own host copies (the
    replayed batch under CUDA graphs, padded to the view's lanes with row 0 / fill value),
    else copied from the device (a sync; out of any graph)."""
    lanes = int(fb.batch_size)
    src = ACTIVE.get("replay_batch") if getattr(fb, "num_padding", None) is not None else fb
    rows = getattr(src, "req_pool_indices_cpu", None)
    lens = getattr(fb, "seq_lens_cpu", None)
    if rows is None:
        rows = fb.req_pool_indices.cpu()  # SYNC: no host copy on this batch
    if lens is None:
        lens = fb.seq_lens.cpu()  # SYNC: no host copy on this batch
    rows = rows.to(torch.int64)
    if rows.numel() < lanes:  # graph padding lanes use request row 0
        rows = torch.cat([rows, torch.zeros(lanes - rows.numel(), dtype=torch.int64)])
    return rows[:lanes], lens.to(torch.int64)[:lanes]


def _stash_replay_batch(self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> None:
    ACTIVE["replay_batch"] = forward_batch
    return None


def _free_rows(self: Any, indices: Any, *args: Any, **kwargs: Any) -> None:
    backend = ACTIVE.get("backend")
    if backend is not None and getattr(self, "req_to_token", None) is not None:
        rows = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        backend.serving.release_rows(rows)
        backend.metrics.update(backend.serving)
    return None


def _free_token_ids(self: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """Allocator ``free``: token ids freed now (a deferred group comes back through here)."""
    backend = ACTIVE.get("backend")
    if backend is None or getattr(self, "free_group", None) is not None:
        return None
    if isinstance(free_index, torch.Tensor) and free_index.numel():
        if backend.serving.free_token_ids(free_index):
            backend.metrics.update(backend.serving)
    return None


def _free_token_segment(self: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """Paged allocator ``free_segment`` (frees page ids directly, grouped or not)."""
    backend = ACTIVE.get("backend")
    if backend is not None and isinstance(free_index, torch.Tensor) and free_index.numel():
        if backend.serving.free_token_ids(free_index):
            backend.metrics.update(backend.serving)
    return None


def _after_checkpoint(result: Any, self: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """RadixCache.checkpoint (after prefill, and at release)."""
    backend = ACTIVE.get("backend")
    row = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    if backend is not None and row is not None and not req.finished():
        backend.serving.after_checkpoint(int(row), backend.req_to_token)
    return None


def _free_all_tokens(self: Any, *args: Any, **kwargs: Any) -> None:
    """Allocator ``clear`` (flush_cache, idle server): every token id is free again."""
    backend = ACTIVE.get("backend")
    if backend is not None:
        backend.serving.free_all_tokens()
        backend.metrics.update(backend.serving)
    return None


def register() -> None:
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if "freekv" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["freekv"])
    register_attention_backend("freekv")(create_backend)
    HookRegistry.register(_FREE_ROWS, _free_rows, HookType.BEFORE)
    HookRegistry.register(_REPLAY, _stash_replay_batch, HookType.BEFORE)
    for tree in _TREES:
        HookRegistry.register(f"{tree}.checkpoint", _after_checkpoint, HookType.AFTER)
    HookRegistry.register(_TOKEN_FREE, _free_token_ids, HookType.BEFORE)
    HookRegistry.register(_TOKEN_CLEAR, _free_all_tokens, HookType.BEFORE)
    HookRegistry.register(_PAGED_FREE, _free_token_ids, HookType.BEFORE)
    HookRegistry.register(_PAGED_SEGMENT, _free_token_segment, HookType.BEFORE)
    HookRegistry.register(_PAGED_CLEAR, _free_all_tokens, HookType.BEFORE)
