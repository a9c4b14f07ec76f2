"""The per-step speculative job: selection, residency diff and recall for all sparse layers
at once (``FreeKVConfig.speculative_job == "step"``, the CPU default).

Why: the per-layer job does the same ~50 small tensor ops once per layer; a CPU engine pays
~5-60 us per op whatever its size, so 30 layers cost ~40 ms per step of worker time that
competes with the model for two cores. Here the layers are folded into the batch: virtual
request ``v = i * bj + b`` is layer ``layers[i]`` of job row ``b``. Its page table points
into the layer's block of the flattened digests (``layer * digest_rows + page``), so one
``select_batch`` and one ``residency_diff`` serve every layer, and the host blocks of all
layers are copied with one gather and one scatter per K/V
(:meth:`~sglang_freekv.recall.FreeKVRecallEngine.recall_layers`). The cache submits a step's
layers as two such jobs (the first third, then the rest), so the next step's first layers
wait only the first.

Same results as one per-layer job per layer with the same inputs: each virtual request is
scored, selected and diffed exactly as its layer's row would be (the rows are independent).
The caller submits it after the last sparse layer's attention of the step, so every slot it
scatters into has been read (race 5 closed by program order on CPU; CUDA keeps the
per-layer job and its events).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sglang_freekv.retrieval import residency_diff, select_batch

if TYPE_CHECKING:
    from sglang_freekv.cache import FreeKVCache

__all__ = ["StepJobInputs", "run_step_job"]


class StepJobInputs:
    """What the step job reads, captured when it is submitted (all on the KV device).

    ``rows [bj] int64`` request rows, ``page_table [bj, max_pages] int32``, ``slot_loc [bj,
    budget_pages] int64``, ``cand_start``/``cand_end [bj] int32`` (candidates at seq_len + 1).
    Plan tensors are fresh per step and never written after they are built (the plan copies
    the engine's row and length tensors, which the engine reuses: race 10), so no copies.
    ``fences``: the step's ``attn_done`` objects (``.wait()``) of attention still running.
    """

    __slots__ = ("rows", "page_table", "slot_loc", "cand_start", "cand_end", "fences")

    def __init__(self, rows: torch.Tensor, page_table: torch.Tensor, slot_loc: torch.Tensor,
                 cand_start: torch.Tensor, cand_end: torch.Tensor,
                 fences: list[Any] | None = None) -> None:
        self.rows, self.page_table, self.slot_loc = rows, page_table, slot_loc
        self.cand_start, self.cand_end = cand_start, cand_end
        self.fences = fences or []


def run_step_job(cache: FreeKVCache, layers: list[int], inp: StepJobInputs) -> None:
    """Select with ``last_q`` of every layer in ``layers``, update their residency and recall
    the new (page, head) blocks (CPU: complete on return). Runs on the recall worker."""
    nl, bj = len(layers), int(inp.rows.numel())
    if nl == 0 or bj == 0:
        return
    dev = cache.device
    h, hq, d = cache.num_kv_heads, cache.num_qo_heads, cache.head_dim
    nhp = cache.digests.shape[1]  # digest rows per layer (host pages + the sink)
    lt = torch.tensor(layers, dtype=torch.int64, device=dev)  # [nl]
    q = cache.last_q.index_select(0, lt).index_select(1, inp.rows)  # [nl, bj, Hq, D]
    pt = inp.page_table.to(torch.int64)  # [bj, max_pages]
    # virtual page tables: the layer's block of the flattened digests, -1 kept
    vpt = torch.where(pt >= 0, pt + (lt * nhp)[:, None, None], -1)  # [nl, bj, max_pages]
    sel, scores = select_batch(
        q.view(nl * bj, hq, d), cache.digests.view(-1, h, 2, d), vpt.view(nl * bj, -1),
        inp.cand_start.repeat(nl), inp.cand_end.repeat(nl), None, h, cache.cfg.top_k,
        cache.score_scale, span_weight=cache.cfg.span_weight)  # [nl * bj, H, k]
    li, ri = lt[:, None].expand(nl, bj), inp.rows[None, :].expand(nl, bj)  # [nl, bj]
    res = cache.residency[li, ri].view(nl * bj, h, -1)  # [nl * bj, H, k] copy
    mask = torch.ones((nl * bj, h), dtype=torch.bool, device=dev)
    rl, new_res = residency_diff(sel, scores, res, mask)
    cache.residency[li, ri] = new_res.view(nl, bj, h, -1)
    # SYNC (free on CPU): the recall list on the host, grouped by layer (entries are in
    # virtual-request order, so each layer's entries are contiguous).
    n = int(rl.count.item())
    if n == 0:
        return
    v, slot = rl.batch[:n], rl.slot[:n]
    b = v % bj
    host_ids = pt[b, rl.page[:n].clamp(min=0)]  # [n] layer-local host page ids
    dst_loc = inp.slot_loc[b, cache.g.sink_pages + slot]  # [n] int64 first slot row
    layer_of = lt.index_select(0, v // bj)  # [n] model layer of each block (grouped by layer)
    fence = _Fences(inp.fences) if inp.fences else None
    # One gather + one scatter per K/V for every layer (CPU; the fences are waited between).
    cache.recall.recall_layers(layer_of, host_ids, rl.head[:n].to(torch.int64), dst_loc,
                               before_scatter=fence)
    cache.add_recall_stats(n)


class _Fences:
    """The step's ``attn_done`` fences as one ``.wait()`` object."""

    __slots__ = ("fences",)

    def __init__(self, fences: list[Any]) -> None:
        self.fences = fences

    def wait(self) -> None:
        for fence in self.fences:
            fence.wait()  # SYNC: attention still reading slots of this step is done (race 5)
