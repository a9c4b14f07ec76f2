"""FreeKVAttnBackend: the ``freekv`` attention backend (CPU torch path).

Changes: registers ``freekv`` in SGLang's attention-backend registry and CLI choices, and
hooks ``ReqToTokenPool.free_rows`` (BEFORE) so every host page, budget slot and staging row
a request holds is returned when SGLang frees its row (finish, abort, retraction).

Per forward:
- extend (prefill; chunked prefill is off under FreeKV): prompt tokens of sparse layers get
  staging rows (``pool.loc_map``); attention runs SGLang's torch-native SDPA over translated
  rows; after the last layer every prompt is committed to FreeKV (host tier, digests, budget
  slots) and its staging rows are returned.
- decode: ``FreeKVCache.plan_decode`` once per step and, per sparse
  layer, ``prepare_layer`` -> token K/V write -> ``before_attention`` -> attention over the
  budget rows (CPU: the same per-request SDPA as torch_native, so budget >= context is
  bit-identical; CUDA: SGLang's Triton decode kernel, ``freekv_decode.py``) ->
  ``after_attention``. Dense layers run stock torch_native over their full-size buffers.
Not CUDA-graph capturable; the launcher turns decode graphs and the overlap scheduler off.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sglang_freekv.attention import sdpa_decode
from sglang_freekv.patches import freekv_metrics
from sglang_freekv.patches.freekv_pool import ACTIVE

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


def _padded_table(indptr: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Ragged row lists -> ``[bs, max_len]`` int64 table (padding repeats row 0)."""
    ptr = indptr.to(torch.int64)
    lens = ptr[1:] - ptr[:-1]
    max_len = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(max_len, device=indices.device)
    idx = (ptr[:-1, None] + pos[None, :]).clamp(max=max(indices.numel() - 1, 0))
    return indices[idx] if indices.numel() else idx


def create_backend(runner: Any) -> Any:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.runtime_context import get_parallel

    class FreeKVAttnBackend(TorchNativeAttnBackend):
        def __init__(self, model_runner: Any) -> None:
            super().__init__(model_runner)
            pool = model_runner.token_to_kv_pool
            if not hasattr(pool, "init_freekv"):
                raise RuntimeError("the freekv attention backend needs --kv-policy freekv")
            self.pool = pool
            tp = get_parallel().attn_tp_size
            self.num_qo_heads = model_runner.model_config.get_num_attention_heads(tp)
            self.cache = pool.init_freekv(self.num_qo_heads)
            self.committed: dict[int, list[int]] = {}  # req row -> its budget chunk
            self.staged: dict[int, torch.Tensor] = {}  # req row -> staging rows
            self.plan: Any = None
            self.table: torch.Tensor | None = None  # [bs, max_kv_len] budget rows
            self.table_lens: list[int] = []  # rows of each table row (CPU path)
            self.ext_table: torch.Tensor | None = None  # [bs, max_seq] translated rows
            self.last_layer = pool.start_layer + pool.layer_num - 1
            self.metrics = freekv_metrics.FreeKVMetrics.create(get_parallel().tp_rank)
            # Prefix sharing: host token slot (page * P + offset) of every live logical token
            # id (-1 none). Each mapped id holds one reference on its host page, dropped when
            # SGLang frees the id (allocator hook), so pages the radix cache still points at
            # outlive their request.
            self.host_of_loc = torch.full((pool.size + pool.page_size + 1,), -1,
                                          dtype=torch.int64)
            self.kv_lens: dict[int, int] = {}  # req row -> tokens with KV (for the flush)
            self.prefix_rows: torch.Tensor | None = None  # staging rows of loaded prefixes
            self.evict_logged = False
            self.radix = not getattr(model_runner.server_args, "disable_radix_cache", True)
            ACTIVE["backend"] = self

        # ---------------------------------------------------------------- metadata
        def init_forward_metadata(self, forward_batch: Any) -> None:
            super().init_forward_metadata(forward_batch)
            mode = forward_batch.forward_mode
            self.plan = None
            if mode.is_idle():
                return
            if mode.is_decode():
                self._plan_decode(forward_batch)
            elif mode.is_extend():
                self._stage_extend(forward_batch)

        def _stage_extend(self, fb: Any) -> None:
            pool = self.pool
            loc = fb.out_cache_loc.to(torch.int64)
            rows = pool.staging.alloc(int(loc.numel()))
            if rows is None:
                raise RuntimeError(
                    f"freekv: prefill staging is full ({pool.staging_rows} rows); lower "
                    "--max-prefill-tokens or the number of concurrent long prompts")
            pool.loc_map[loc] = rows
            req_rows = fb.req_pool_indices.tolist()
            start = 0
            for row, n in zip(req_rows, fb.extend_seq_lens_cpu):
                prev = self.staged.get(row)
                mine = rows[start : start + n]
                self.staged[row] = mine if prev is None else torch.cat([prev, mine])
                start += n
            r2t = self.req_to_token_pool.req_to_token
            prefix_lens = list(fb.extend_prefix_lens_cpu or [0] * len(req_rows))
            if any(prefix_lens):
                self._stage_prefixes(req_rows, prefix_lens)
            max_len = int(fb.seq_lens_cpu.max())
            self.ext_table = pool.loc_map[r2t[fb.req_pool_indices, :max_len].to(torch.int64)]

        def _stage_prefixes(self, req_rows: list[int], prefix_lens: list[int]) -> None:
            """Matched prefixes (radix cache): load their K/V of every sparse layer from the
            host tier into staging rows, so prefill attends over them and commit can copy."""
            pool, cache, r2t = self.pool, self.cache, self.req_to_token_pool.req_to_token
            ids = torch.unique(torch.cat([r2t[row, :n].to("cpu", torch.int64)
                                          for row, n in zip(req_rows, prefix_lens) if n]))
            slots = self.host_of_loc[ids]
            if bool((slots < 0).any()):
                raise RuntimeError("freekv: a cached prefix token has no host-tier copy")
            rows = pool.staging.alloc(int(ids.numel()))
            if rows is None:
                raise RuntimeError(f"freekv: prefill staging is full ({pool.staging_rows} "
                                   "rows) while loading cached prefixes")
            for layer in cache.sparse_layers:
                k, v = cache.load_tokens(layer, slots)
                pool.k_buffer[layer][rows] = k
                pool.v_buffer[layer][rows] = v
            pool.loc_map[ids.to(pool.loc_map.device)] = rows
            self.prefix_rows = rows

        def _shared_pages(self, row: int, prefix_len: int) -> torch.Tensor:
            """Host pages that hold whole leading pages of a matched prefix: the page's P
            token ids map, in order, to one host page (``[f]`` int64, cpu)."""
            p = self.cache.g.page_size
            full = prefix_len // p
            if full == 0:
                return torch.empty(0, dtype=torch.int64)
            ids = self.req_to_token_pool.req_to_token[row, : full * p].to("cpu", torch.int64)
            s = self.host_of_loc[ids].view(full, p)
            ok = (s[:, 0] >= 0) & (s[:, 0] % p == 0)
            ok &= (s == s[:, :1] + torch.arange(p)).all(1)
            f = int(ok.to(torch.int64).cumprod(0).sum())
            return s[:f, 0] // p

        def _map_tokens(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
            """Point logical ``ids`` at host ``slots`` (one page reference per id)."""
            ids, slots = ids.to("cpu", torch.int64), slots.to("cpu", torch.int64)
            keep = slots >= 0
            ids, slots = ids[keep], slots[keep]
            old = self.host_of_loc[ids]
            self.cache.host.incref(slots // self.cache.g.page_size)  # before the old drop
            self.host_of_loc[ids] = slots
            self.cache.host.decref(old[old >= 0] // self.cache.g.page_size)  # id reused

        def after_checkpoint(self, row: int) -> None:
            """The radix cache replaced some of a running request's token ids by the ids of
            an identical cached prefix (and freed its own): move the request's full pages to
            the cached copies, so duplicate host pages do not outgrow the host tier."""
            if row not in self.committed:
                return
            shared = self._shared_pages(row, self.kv_lens.get(row, 0))
            f = int(shared.numel())
            if f == 0:
                return
            mine = self.cache.t.host_pages_cpu[row, :f].to(torch.int64)
            diff = torch.nonzero(mine != shared).flatten()
            self.cache.replace_pages(row, diff, shared[diff])

        def ensure_host_pages(self, n: int) -> None:
            """Make ``n`` host pages free, evicting radix-cache entries if needed (cached
            prefixes hold host pages; the host tier holds ``max_total_tokens`` plus one page
            per request, so partial cached pages can exhaust it before the token pool)."""
            host = self.cache.host
            tree = getattr(ACTIVE.get("scheduler"), "tree_cache", None)
            if host.free_pages >= n:
                return
            log = logger.debug if self.evict_logged else logger.info
            self.evict_logged = True
            log("freekv: host tier has %d free pages, %d needed: evicting radix-cache entries "
                "(logged once at info)", host.free_pages, n)
            if tree is None:
                return
            from sglang.srt.mem_cache.base_prefix_cache import EvictParams

            p = self.cache.g.page_size
            while host.free_pages < n:
                want = max(p, (n - host.free_pages) * p)
                if tree.evict(EvictParams(num_tokens=want)).num_tokens_evicted == 0:
                    break  # nothing evictable: the allocation below raises a clear error

        def free_token_ids(self, ids: torch.Tensor) -> None:
            """SGLang freed logical ``ids``: drop their host page references."""
            ids = ids.to("cpu", torch.int64)
            ids = ids[(ids >= 0) & (ids < self.host_of_loc.numel())]
            slots = self.host_of_loc[ids]
            self.host_of_loc[ids] = -1
            if self.cache.host.decref(slots[slots >= 0] // self.cache.g.page_size):
                self.metrics.update(self)

        def _commit(self, row: int, prompt_len: int, prefix_len: int = 0) -> None:
            pool = self.pool
            if row in self.committed:  # a retracted request comes back through release
                self.release_rows([row])
            logical = self.req_to_token_pool.req_to_token[row, :prompt_len].to(torch.int64)
            prompt_rows = pool.loc_map[logical]
            chunk = pool.slots.alloc_pages(1)
            if chunk is None:  # cannot happen: one chunk per request row
                raise RuntimeError("freekv: no free budget slots")
            g = self.cache.g
            slot_loc = chunk[0] + torch.arange(g.budget_pages, dtype=torch.int64) * g.page_size
            self.cache.admit(row, slot_loc)
            shared = self._shared_pages(row, prefix_len) if prefix_len else None
            n_shared = 0 if shared is None else int(shared.numel())
            self.ensure_host_pages(-(-prompt_len // g.page_size) - n_shared)
            self.cache.commit_prefill(row, prompt_len, prompt_rows, shared)
            self._map_tokens(logical[prefix_len:],
                             self.cache.token_host_slots(row, prefix_len, prompt_len))
            self.kv_lens[row] = prompt_len
            staged = self.staged.pop(row, None)
            if staged is not None:
                pool.staging.free(staged)
            self.committed[row] = chunk

        def _plan_decode(self, fb: Any) -> None:
            rows_cpu = fb.req_pool_indices.to("cpu", torch.int64)
            lens_cpu = (fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens).to(
                "cpu", torch.int64)
            for row, n in zip(rows_cpu.tolist(), lens_cpu.tolist()):
                if row not in self.committed:
                    self._commit(row, n - 1)
            self.ensure_host_pages(int(rows_cpu.numel()))  # at most one opened page each
            self.plan = self.cache.plan_decode(fb.req_pool_indices, fb.seq_lens, lens_cpu,
                                               rows_cpu)
            # The torch path's padded row table (its max length is a host sync on a GPU,
            # where the Triton kernel reads the ragged lists directly).
            self.table = (None if self.plan.kv_indices.is_cuda
                          else _padded_table(self.plan.kv_indptr, self.plan.kv_indices))
            self.table_lens = [] if self.table is None else self.plan.kv_lens.tolist()
            # This step's token: its host slot (the page was opened by plan_decode).
            p = self.cache.g.page_size
            pos = lens_cpu - 1
            page = self.cache.t.host_pages_cpu[rows_cpu, pos // p].to(torch.int64)
            self._map_tokens(fb.out_cache_loc, page * p + pos % p)
            for row, n in zip(rows_cpu.tolist(), lens_cpu.tolist()):
                self.kv_lens[row] = n

        # ---------------------------------------------------------------- forward
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[no-untyped-def]
            if not self.pool.is_sparse_layer(layer.layer_id):
                o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            else:
                o = torch.empty_like(q)
                if save_kv_cache and k is not None and v is not None:
                    self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
                hq, d = layer.tp_q_head_num, layer.qk_head_dim
                local = layer.layer_id - self.pool.start_layer
                self._run_sdpa_forward_extend(
                    q.view(-1, hq, d), o.view(-1, hq, layer.v_head_dim),
                    self.pool.k_buffer[local], self.pool.v_buffer[local],
                    self.ext_table, torch.arange(forward_batch.batch_size),
                    forward_batch.seq_lens, forward_batch.extend_prefix_lens,
                    forward_batch.extend_seq_lens, None, scaling=layer.scaling,
                    enable_gqa=hq != layer.tp_k_head_num, causal=True,
                )
            if layer.layer_id == self.last_layer:
                # Every layer has written this batch's K/V: commit the prompts (chunked
                # prefill is off under FreeKV, so each extend holds whole prompts).
                rows = forward_batch.req_pool_indices.tolist()
                prefix_lens = list(forward_batch.extend_prefix_lens_cpu or [0] * len(rows))
                for row, n, m in zip(rows, forward_batch.seq_lens_cpu.tolist(), prefix_lens):
                    self._commit(row, n, m)
                if self.prefix_rows is not None:
                    self.pool.staging.free(self.prefix_rows)
                    self.prefix_rows = None
                self.metrics.update(self)
            return o

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # type: ignore[no-untyped-def]
            lid = layer.layer_id
            if not self.pool.is_sparse_layer(lid):
                out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            else:
                out = self._sparse_decode(q, k, v, layer)
            if lid == self.last_layer:
                self.metrics.update(self)
            return out

        def _sparse_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layer: Any) -> torch.Tensor:
            plan, cache, pool = self.plan, self.cache, self.pool
            lid = layer.layer_id
            local = lid - pool.start_layer
            hq, d = layer.tp_q_head_num, layer.qk_head_dim
            q3 = q.reshape(-1, hq, d)  # [bs, Hq, D]
            kb, vb = pool.k_buffer[local], pool.v_buffer[local]
            cache.prepare_layer(local, plan)  # dense-regime window exit before the write
            kb[plan.token_loc] = k.reshape(-1, layer.tp_k_head_num, d).to(kb.dtype)
            vb[plan.token_loc] = v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim).to(vb.dtype)
            cache.before_attention(local, plan, q3)
            if q3.is_cuda:  # GPU: SGLang's Triton decode kernel over the budget rows
                from sglang_freekv.patches.freekv_decode import triton_decode

                o = triton_decode(q3, kb, vb, plan.kv_indptr, plan.kv_indices, plan.kv_lens,
                                  layer.scaling)
            else:  # CPU: SDPA per request, as torch_native, with a row-wise gather
                o = sdpa_decode(q3, kb, vb, self.table, self.table_lens, layer.scaling)
            cache.after_attention(local, plan, q3)
            return o.reshape(-1, hq * layer.v_head_dim)

        # ---------------------------------------------------------------- release
        def release_rows(self, rows: list[int]) -> None:
            pool = self.pool
            for row in rows:
                chunk = self.committed.pop(row, None)
                kv_len = self.kv_lens.pop(row, None)
                if chunk is not None:
                    # With the radix cache the engine may keep this request's token ids: its
                    # partial last page must then be readable from the host tier.
                    self.cache.release(row, kv_len if self.radix else None)
                    pool.slots.free(chunk)
                staged = self.staged.pop(row, None)
                if staged is not None:
                    pool.staging.free(staged)
            self.metrics.update(self)

    return FreeKVAttnBackend(runner)


def _free_rows(self: Any, indices: Any, *args: Any, **kwargs: Any) -> None:
    backend = ACTIVE.get("backend")
    if backend is not None and getattr(self, "req_to_token", None) is not None:
        rows = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        backend.release_rows(rows)
    return None


def _free_token_ids(self: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """Allocator ``free``: token ids freed now (a deferred group comes back through here)."""
    backend = ACTIVE.get("backend")
    if backend is None or getattr(self, "free_group", None) is not None:
        return None
    if isinstance(free_index, torch.Tensor) and free_index.numel():
        backend.free_token_ids(free_index)
    return None


def _free_token_segment(self: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """Paged allocator ``free_segment`` (frees page ids directly, grouped or not)."""
    backend = ACTIVE.get("backend")
    if backend is not None and isinstance(free_index, torch.Tensor) and free_index.numel():
        backend.free_token_ids(free_index)
    return None


def _after_checkpoint(result: Any, self: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """RadixCache.checkpoint (after prefill, and at release)."""
    backend = ACTIVE.get("backend")
    row = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    if backend is not None and row is not None and not req.finished():
        backend.after_checkpoint(int(row))
    return None


def _free_all_tokens(self: Any, *args: Any, **kwargs: Any) -> None:
    """Allocator ``clear`` (flush_cache, idle server): every token id is free again."""
    backend = ACTIVE.get("backend")
    if backend is not None:
        backend.free_token_ids(torch.nonzero(backend.host_of_loc >= 0).flatten())
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
    for tree in _TREES:
        HookRegistry.register(f"{tree}.checkpoint", _after_checkpoint, HookType.AFTER)
    HookRegistry.register(_TOKEN_FREE, _free_token_ids, HookType.BEFORE)
    HookRegistry.register(_TOKEN_CLEAR, _free_all_tokens, HookType.BEFORE)
    HookRegistry.register(_PAGED_FREE, _free_token_ids, HookType.BEFORE)
    HookRegistry.register(_PAGED_SEGMENT, _free_token_segment, HookType.BEFORE)
    HookRegistry.register(_PAGED_CLEAR, _free_all_tokens, HookType.BEFORE)
