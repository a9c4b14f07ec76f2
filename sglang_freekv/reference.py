"""Reference multi-layer decode driver (torch): FreeKVCache over random seeded q/k/v.

Plays the engine: owns per-layer NHD ``k_buffers``/``v_buffers`` holding a *dense* region
(every token of every request, ``req_to_token``) and a *budget* region (the FreeKV slots).
Each decode step, per layer: ``prepare_layer`` -> write the token's K/V (dense row and
``plan.token_loc``) -> ``before_attention`` -> attention over budget rows (FreeKV) and over
dense rows (ground truth) -> ``after_attention``. Also holds the brute-force selection rule
used by the tests. Never imports sglang.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang_freekv.attention import ref_decode_attention
from sglang_freekv.cache import FreeKVCache
from sglang_freekv.config import FreeKVConfig
from sglang_freekv.layout import dense_attention_indices
from sglang_freekv.plan import FreeKVDecodePlan

__all__ = ["ReferenceDecoder", "StepOutput", "brute_force_topk", "group_cosine"]

LayerCallback = Callable[[int, FreeKVDecodePlan, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class StepOutput:
    rows: list[int]
    seq_lens: list[int]  # incl. the token of this step
    outputs: list[torch.Tensor] = field(default_factory=list)  # per layer [bs, Hq, D]
    dense: list[torch.Tensor] = field(default_factory=list)  # per layer [bs, Hq, D]
    queries: list[torch.Tensor] = field(default_factory=list)  # per layer [bs, Hq, D]
    late: list[torch.Tensor] = field(default_factory=list)  # late_attention outputs


class LateFence:
    """The ``attn_done`` fence of an attention that runs late (race-5 tests): ``wait`` (the
    speculative job, before its scatter) says it is waiting, then blocks until ``open``."""

    def __init__(self) -> None:
        self._reached = threading.Event()  # the job waits this fence, or has finished
        self._open = threading.Event()

    def wait(self) -> None:
        self._reached.set()
        if not self._open.wait(timeout=60):
            raise TimeoutError("LateFence: the late attention never finished")

    def open(self) -> None:
        self._open.set()

    def job_went_as_far_as_it_can(self, job: Any) -> None:
        """Block until the job waits this fence or has finished (no job: return)."""
        if job is None:
            return
        job.add_done_callback(lambda _: self._reached.set())
        if not self._reached.wait(timeout=60):
            raise TimeoutError("LateFence: the speculative job neither waited nor finished")


class ReferenceDecoder:
    """Seeded engine stand-in around one FreeKVCache (CPU by default)."""

    def __init__(
        self,
        cfg: FreeKVConfig,
        *,
        num_layers: int = 2,
        num_qo_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 16,
        dtype: torch.dtype = torch.float32,
        max_reqs: int = 6,
        max_len: int = 512,
        num_host_pages: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        recall_group_blocks: int = 8,
        q_noise: tuple[float, ...] = (0.2, 0.5, 1.0),
        reuse_q_buffer: bool = False,
        per_request_inputs: bool = False,
    ) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.num_layers, self.hq, self.h, self.d = num_layers, num_qo_heads, num_kv_heads, head_dim
        self.max_reqs, self.max_len = max_reqs, max_len
        self.gen = torch.Generator().manual_seed(seed)
        self.q_noise = q_noise
        # per_request_inputs: every request draws its prompt K/V, queries and new K/V from
        # its own generator (seeded by add_request's ``seed``), so a request gets the same
        # inputs alone or next to others (batch-invariance tests); else one shared stream.
        self.per_request_inputs = per_request_inputs
        self.req_gen: dict[int, torch.Generator] = {}
        p, bp = cfg.page_size, cfg.budget_pages
        dense_rows = max_reqs * max_len
        rows = dense_rows + max_reqs * bp * p
        shape = (rows, num_kv_heads, head_dim)
        # one allocation for every layer's K and V, as the FreeKV pool does
        kv = torch.zeros((num_layers, 2, *shape), dtype=dtype, device=device)
        self.k_buffers = list(kv[:, 0].unbind(0))
        self.v_buffers = list(kv[:, 1].unbind(0))
        self.req_to_token = (torch.arange(max_reqs)[:, None] * max_len
                             + torch.arange(max_len)).to(device)  # [max_reqs, max_len]
        max_pages = -(-max_len // p)
        if num_host_pages is None:
            num_host_pages = max_reqs * max_pages
        self.cache = FreeKVCache(
            cfg, num_layers=num_layers, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=dtype, device=device, max_reqs=max_reqs,
            max_pages_per_req=max_pages, num_host_pages=num_host_pages,
            k_buffers=self.k_buffers, v_buffers=self.v_buffers,
            recall_group_blocks=recall_group_blocks)
        self._dense_rows = dense_rows
        self.seq_len: dict[int, int] = {}
        self.decoded: dict[int, int] = {}  # decode steps done per row
        self.base_q: dict[int, torch.Tensor] = {}  # [L, Hq, D] per row
        self.scale = head_dim ** -0.5
        # An engine-style static q buffer, overwritten by every layer (race-6 tests), and a
        # callback after each overwrite.
        self._q_buf = (torch.empty((max_reqs, num_qo_heads, head_dim), dtype=dtype,
                                   device=device) if reuse_q_buffer else None)
        self.on_q_write: Callable[[], None] | None = None

    def _randn(self, *shape: int, gen: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=gen or self.gen).to(self.device, self.dtype)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_len: int, seed: int = 0) -> int:
        """Prefill a request of ``prompt_len`` random tokens; returns its row. ``seed``: its
        inputs' generator when the decoder has ``per_request_inputs``."""
        row = next(r for r in range(self.max_reqs) if r not in self.seq_len)
        gen = self.gen
        if self.per_request_inputs:
            gen = self.req_gen[row] = torch.Generator().manual_seed(seed)
        p, bp = self.cfg.page_size, self.cfg.budget_pages
        loc = self.req_to_token[row, :prompt_len]
        for layer in range(self.num_layers):
            self.k_buffers[layer][loc] = self._randn(prompt_len, self.h, self.d, gen=gen)
            self.v_buffers[layer][loc] = self._randn(prompt_len, self.h, self.d, gen=gen)
        perm = torch.randperm(bp, generator=gen)  # slots need not be in order
        slot_loc = self._dense_rows + (row * bp + perm) * p
        self.cache.admit(row, slot_loc.to(torch.int64))
        self.cache.commit_prefill(row, prompt_len, loc)
        self.seq_len[row] = prompt_len
        self.decoded[row] = 0
        self.base_q[row] = self._randn(self.num_layers, self.hq, self.d, gen=gen)
        return row

    def remove_request(self, row: int) -> None:
        self.cache.release(row)
        del self.seq_len[row], self.decoded[row], self.base_q[row]
        self.req_gen.pop(row, None)

    # ------------------------------------------------------------------ decode
    def step(self, rows: list[int], on_layer: LayerCallback | None = None,
             late_attention: bool = False) -> StepOutput:
        """One decode step of ``rows`` through every layer.

        ``late_attention``: emulate an asynchronous attention kernel (race-5 tests): each
        sparse layer's FreeKV attention is computed again on a thread that starts after
        ``after_attention`` returned and reads the slots only once the layer's speculative
        job has gone as far as it can: it waits the ``attn_done`` fence (the protected
        order) or it finished (the fence was dropped). The fence opens when that late
        attention is done; the late outputs go to ``StepOutput.late``.
        """
        cache, dev = self.cache, self.device
        n = [self.seq_len[r] + 1 for r in rows]
        rows_t = torch.tensor(rows, dtype=torch.int64)
        n_t = torch.tensor(n, dtype=torch.int64)
        plan = cache.plan_decode(rows_t.to(dev), n_t.to(dev), n_t, rows_t)
        dense_loc = self.req_to_token[rows_t.to(dev), n_t.to(dev) - 1]  # [bs]
        d_indptr, d_indices, _ = dense_attention_indices(self.req_to_token, rows_t.to(dev),
                                                         n_t.to(dev))
        out = StepOutput(rows=list(rows), seq_lens=n)
        bs = len(rows)
        for layer in range(self.num_layers):
            q, k_new, v_new = self._step_inputs(rows, layer)
            if self._q_buf is not None:
                q = self._q_buf[:bs].copy_(q)  # same memory for every layer
                if self.on_q_write is not None:
                    self.on_q_write()
            kb, vb = self.k_buffers[layer], self.v_buffers[layer]
            cache.prepare_layer(layer, plan)
            kb[dense_loc], vb[dense_loc] = k_new, v_new
            sparse_layer = layer not in self.cfg.dense_layers
            if sparse_layer:
                kb[plan.token_loc], vb[plan.token_loc] = k_new, v_new
            cache.before_attention(layer, plan, q)
            dense = ref_decode_attention(q, kb, vb, d_indptr, d_indices, self.scale)
            o = (ref_decode_attention(q, kb, vb, plan.kv_indptr, plan.kv_indices, self.scale)
                 if sparse_layer else dense)
            if on_layer is not None:
                on_layer(layer, plan, q, o, dense)
            if late_attention and sparse_layer:
                fence = LateFence()
                cache.after_attention(layer, plan, q, attn_done=fence)
                job = cache._jobs.get(layer)  # this step's job, if one was submitted
                box: dict[str, torch.Tensor] = {}

                def late(q=q, plan=plan, kb=kb, vb=vb, box=box, fence=fence, job=job) -> None:
                    fence.job_went_as_far_as_it_can(job)
                    box["o"] = ref_decode_attention(q, kb, vb, plan.kv_indptr,
                                                    plan.kv_indices, self.scale)
                    fence.open()

                th = threading.Thread(target=late)
                th.start()
                th.join()
                out.late.append(box["o"])
            else:
                cache.after_attention(layer, plan, q)
                out.late.append(o)
            out.outputs.append(o)
            out.dense.append(dense)
            out.queries.append(q.clone())
        for r, nn in zip(rows, n):
            self.seq_len[r] = nn
            self.decoded[r] += 1
        return out

    def _step_inputs(self, rows: list[int], layer: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[bs, Hq, D]``, new K and V ``[bs, H, D]`` of one layer of one step."""
        bs = len(rows)
        base = torch.stack([self.base_q[r][layer] for r in rows])  # [bs, Hq, D]
        if not self.per_request_inputs:
            sigma = self.q_noise[int(torch.randint(len(self.q_noise), (1,), generator=self.gen))]
            q = base + sigma * self._randn(bs, self.hq, self.d)
            return q, self._randn(bs, self.h, self.d), self._randn(bs, self.h, self.d)
        qs, ks, vs = [], [], []
        for b, r in enumerate(rows):
            gen = self.req_gen[r]
            sigma = self.q_noise[int(torch.randint(len(self.q_noise), (1,), generator=gen))]
            qs.append(base[b] + sigma * self._randn(self.hq, self.d, gen=gen))
            ks.append(self._randn(self.h, self.d, gen=gen))
            vs.append(self._randn(self.h, self.d, gen=gen))
        return torch.stack(qs), torch.stack(ks), torch.stack(vs)

    # ------------------------------------------------------------------ truth
    def page_keys(self, layer: int, row: int, pages: torch.Tensor) -> torch.Tensor:
        """Dense-truth keys of logical ``pages`` (``[c]``): ``[c, P, H, D]``."""
        p = self.cfg.page_size
        pos = pages[:, None] * p + torch.arange(p)
        return self.k_buffers[layer][self.req_to_token[row][pos.to(self.device)]]

    def expected_topk(self, layer: int, row: int, q: torch.Tensor, seq_len: int) -> list[set[int]]:
        """Brute-force selection rule for one request: per KV head, the top-k page set."""
        g = self.cache.g
        n_pages = -(-seq_len // g.page_size)
        cand = torch.arange(g.sink_pages, max(g.sink_pages, n_pages - g.window_pages))
        return brute_force_topk(q, self.page_keys(layer, row, cand), cand, g.top_k,
                                self.cache.score_scale, self.cfg.span_weight)


def brute_force_topk(
    q: torch.Tensor, keys: torch.Tensor, pages: torch.Tensor, top_k: int, scale: float = 1.0,
    span_weight: float = 0.0,
) -> list[set[int]]:
    """Quest bound + fp32 softmax over pages per q head + group mean (+ span continuation:
    a page scores at least ``span_weight`` x its predecessor) + top-k, per KV head.

    ``q [Hq, D]``, ``keys [c, P, H, D]`` of candidate ``pages [c]`` (consecutive), ``scale``
    the softmax temperature; returns H sets.
    """
    hq, d = q.shape
    c, _, h, _ = keys.shape
    kf = keys.float()
    mn, mx = kf.amin(1), kf.amax(1)  # [c, H, D]
    qf = q.float().view(h, hq // h, d)  # [H, G, D]
    s = torch.maximum(qf[:, :, None, :] * mn.permute(1, 0, 2)[:, None],
                      qf[:, :, None, :] * mx.permute(1, 0, 2)[:, None]).sum(-1)  # [H, G, c]
    score = torch.softmax(s * scale, dim=-1).mean(1)  # [H, c]
    if span_weight > 0 and c > 1:
        score = torch.cat([score[:, :1], torch.maximum(score[:, 1:],
                                                       span_weight * score[:, :-1])], dim=1)
    kk = min(top_k, c)
    idx = torch.topk(score, kk, dim=-1).indices  # [H, kk]
    return [set(pages[idx[i]].tolist()) for i in range(h)]


def group_cosine(q: torch.Tensor, last_q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Group-mean cosine of ``q`` and ``last_q`` (``[..., Hq, D]``) -> ``[..., H]`` fp32."""
    cos = torch.nn.functional.cosine_similarity(q.float(), last_q.float(), dim=-1)
    return cos.view(*cos.shape[:-1], num_kv_heads, -1).mean(-1)
