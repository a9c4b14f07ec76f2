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
  layer, ``prepare_layer`` -> token K/V write -> ``before_attention`` -> SDPA over the budget
  rows (same per-request SDPA as torch_native, so budget >= context is bit-identical) ->
  ``after_attention``. Dense layers run stock torch_native over their full-size buffers.
Not CUDA-graph capturable; the launcher turns decode graphs and the overlap scheduler off.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sglang_freekv.patches import freekv_metrics
from sglang_freekv.patches.freekv_pool import ACTIVE

logger = logging.getLogger(__name__)

_FREE_ROWS = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows"


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
            self.ext_table: torch.Tensor | None = None  # [bs, max_seq] translated rows
            self.last_layer = pool.start_layer + pool.layer_num - 1
            self.metrics = freekv_metrics.FreeKVMetrics.create(get_parallel().tp_rank)
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
            max_len = int(fb.seq_lens_cpu.max())
            r2t = self.req_to_token_pool.req_to_token
            self.ext_table = pool.loc_map[r2t[fb.req_pool_indices, :max_len].to(torch.int64)]

        def _commit(self, row: int, prompt_len: int) -> None:
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
            self.cache.commit_prefill(row, prompt_len, prompt_rows)
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
            self.plan = self.cache.plan_decode(fb.req_pool_indices, fb.seq_lens, lens_cpu,
                                               rows_cpu)
            self.table = _padded_table(self.plan.kv_indptr, self.plan.kv_indices)

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
                for row, n in zip(rows, forward_batch.seq_lens_cpu.tolist()):
                    self._commit(row, n)
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
            o = torch.empty_like(q3)
            self._run_sdpa_forward_decode(
                q3, o, kb, vb, self.table, torch.arange(plan.bs), plan.kv_lens,
                None, scaling=layer.scaling, enable_gqa=hq != layer.tp_k_head_num,
                causal=False,
            )
            cache.after_attention(local, plan, q3)
            return o.reshape(-1, hq * layer.v_head_dim)

        # ---------------------------------------------------------------- release
        def release_rows(self, rows: list[int]) -> None:
            pool = self.pool
            for row in rows:
                chunk = self.committed.pop(row, None)
                if chunk is not None:
                    self.cache.release(row)
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
