"""Parts of bench_gpu_step.py: shapes, the synthetic Llama-shaped model, the shared-context
groups of requests, the Triton split-KV decode attention every mode of the benchmark uses,
and the report (plot, table).

torch + triton only. Set ``TRITON_INTERPRET`` before importing this module (CPU dry runs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from _results import COLORS, LABELS

__all__ = ["LLAMA_8B", "TINY", "Group", "Shapes", "SyntheticModel", "check_attention",
           "decode_attention", "plot_step", "print_table", "ref_decode_attention", "rms_norm",
           "time_events", "time_wall"]


# ---------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    qo_heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    page: int
    budget: int
    sink: int
    window: int
    contexts: tuple[int, ...]
    short_context: int  # dense reference context (the 1.15x target)
    check_context: int  # budget covers it: freekv == dense
    batches: tuple[int, ...]
    dtype: torch.dtype


LLAMA_8B = Shapes(32, 4096, 32, 8, 128, 14336, 128256, 32, 2048, 512, 512,
                  (32768, 131072), 2048, 1024, (1, 8), torch.bfloat16)
TINY = Shapes(3, 64, 4, 2, 16, 128, 128, 8, 48, 8, 16, (64, 160), 48, 16, (1, 2),
              torch.float32)


# ---------------------------------------------------------------------------- attention
@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, mid_o_ptr, mid_lse_ptr,
                  stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
                  stride_tb, scale, chunk, num_splits,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    # one program: tokens [s*chunk, (s+1)*chunk) of request b, the GROUP query heads of KV
    # head h; writes the normalised partial output and its log-sum-exp
    s = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n = tl.load(lens_ptr + b)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, n)
    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    qh = h * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        idx = start + offs_n
        nmask = idx < hi
        rows = tl.load(table_ptr + b * stride_tb + idx, mask=nmask, other=0).to(tl.int64)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:  # fp32 inputs: no tf32
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_H, BLOCK_N] fp32
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows[:, None] * stride_vr + h * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    has = l_sum > 0
    o = acc / tl.where(has, l_sum, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf"))
    base = (b * (tl.num_programs(1) * GROUP) + qh) * num_splits + s  # [BLOCK_H]
    tl.store(mid_o_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], o,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(mid_lse_ptr + base, lse, mask=gmask)


@triton.jit
def _combine_kernel(mid_o_ptr, mid_lse_ptr, o_ptr, stride_ob, stride_oh, num_qo_heads,
                    num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # one program per (request, query head): the splits' outputs weighted by exp(lse - max)
    b = tl.program_id(0)
    hq = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    base = (b * num_qo_heads + hq) * num_splits
    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(mid_lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse)
    m = tl.max(m_vec, 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_vec = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):  # [BLOCK_S, D] tiles: no register spill
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < num_splits
        lse = tl.load(mid_lse_ptr + base + offs_s, mask=smask, other=float("-inf"))
        w = tl.exp(lse - m)  # empty splits: 0
        part = tl.load(mid_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
        w_vec += w
    w_sum = tl.sum(w_vec, 0)
    tl.store(o_ptr + b * stride_ob + hq * stride_oh + offs_d,
             (acc / w_sum).to(o_ptr.dtype.element_ty), mask=dmask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Decode attention of ``q [bs, Hq, D]`` over rows ``table[b, :lens[b]]`` of the NHD
    buffers ``k_buf``/``v_buf [rows, H, D]``; ``table [bs, W]`` int32, ``lens [bs]`` int32
    (>= 1), device tensors. Returns ``[bs, Hq, D]`` in ``q``'s dtype. Split-KV: the number
    of splits depends only on static shapes (graph-capturable, no host sync)."""
    bs, hq, d = q.shape
    h = k_buf.shape[1]
    width = table.shape[1]
    block_n = 64
    target = 4 * _num_sms(q.device)  # programs in flight
    splits = max(1, min(triton.cdiv(target, bs * h), triton.cdiv(width, block_n)))
    chunk = triton.cdiv(triton.cdiv(width, splits), block_n) * block_n
    splits = triton.cdiv(width, chunk)
    mid_o = torch.empty((bs, hq, splits, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bs, hq, splits), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    _split_kernel[(splits, h, bs)](
        q, k_buf, v_buf, table, lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), table.stride(0), d ** -0.5, chunk, splits,
        GROUP=hq // h, HEAD_DIM=d, BLOCK_H=max(16, triton.next_power_of_2(hq // h)),
        BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    out = torch.empty_like(q)
    _combine_kernel[(bs, hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), hq, splits,
                              HEAD_DIM=d, BLOCK_S=min(16, triton.next_power_of_2(splits)),
                              BLOCK_D=block_d)
    return out


def ref_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                         table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """fp64 PyTorch reference of :func:`decode_attention` (loops over requests)."""
    bs, hq, d = q.shape
    g = hq // k_buf.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(bs):
        rows = table[b, : int(lens[b])].long()
        k = k_buf[rows].double().repeat_interleave(g, dim=1)  # [n, Hq, D]
        v = v_buf[rows].double().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * d ** -0.5
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


def check_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    """Kernel vs fp64 reference on random data (odd lengths, a 1-token request)."""
    gen = torch.Generator(device=device).manual_seed(7)
    bs, h, g, rows, width = 3, 2, 4, 700, 600
    q = torch.randn((bs, h * g, head_dim), generator=gen, device=device).to(dtype)
    kb = torch.randn((rows, h, head_dim), generator=gen, device=device).to(dtype)
    vb = torch.randn((rows, h, head_dim), generator=gen, device=device).to(dtype)
    table = torch.randint(0, rows, (bs, width), generator=gen, device=device,
                          dtype=torch.int32)
    lens = torch.tensor([width, 1, 333], dtype=torch.int32, device=device)
    out = decode_attention(q, kb, vb, table, lens).double()
    ref = ref_decode_attention(q, kb, vb, table, lens)
    rel = float((out - ref).norm() / ref.norm())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return {"rel_err": rel, "tol": tol, "ok": bool(rel <= tol)}


# ---------------------------------------------------------------------------- model
def rms_norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


class SyntheticModel:
    """Llama-shaped decoder with random weights (see the module docstring).

    ``u [L, H, D]``: the per-(layer, KV head) unit direction shared by the query bias and
    the context keys' page shifts.
    """

    def __init__(self, s: Shapes, device: torch.device, seed: int, q_bias: float) -> None:
        self.s = s
        gen = torch.Generator(device=device).manual_seed(seed)
        qkv = (s.qo_heads + 2 * s.kv_heads) * s.head_dim
        res = 1.0 / math.sqrt(2 * s.layers)  # residual branches scaled: stable stream

        def w(shape: tuple[int, int], std: float) -> torch.Tensor:
            return torch.empty(shape, dtype=s.dtype, device=device).normal_(0.0, std,
                                                                             generator=gen)

        self.wqkv = [w((s.hidden, qkv), s.hidden ** -0.5) for _ in range(s.layers)]
        self.wo = [w((s.qo_heads * s.head_dim, s.hidden), res * (s.qo_heads * s.head_dim) ** -0.5)
                   for _ in range(s.layers)]
        self.wgu = [w((s.hidden, 2 * s.inter), s.hidden ** -0.5) for _ in range(s.layers)]
        self.wd = [w((s.inter, s.hidden), res * s.inter ** -0.5) for _ in range(s.layers)]
        self.wlm = w((s.hidden, s.vocab), s.hidden ** -0.5)
        u = torch.randn((s.layers, s.kv_heads, s.head_dim), generator=gen, device=device)
        self.u = u / u.norm(dim=-1, keepdim=True)  # [L, H, D] fp32
        group = s.qo_heads // s.kv_heads
        bias = q_bias * math.sqrt(s.head_dim) * self.u.repeat_interleave(group, dim=1)
        self.q_bias = bias.reshape(s.layers, -1).to(s.dtype)  # [L, Hq * D]

    @property
    def weight_bytes(self) -> int:
        ts = self.wqkv + self.wo + self.wgu + self.wd + [self.wlm]
        return sum(t.numel() * t.element_size() for t in ts)

    def forward(self, x: torch.Tensor, attn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``x [bs, hidden]`` -> logits ``[bs, vocab]`` fp32; ``attn(layer, q, k, v)``."""
        s = self.s
        bs = x.shape[0]
        nq, nkv = s.qo_heads * s.head_dim, s.kv_heads * s.head_dim
        for layer in range(s.layers):
            qkv = rms_norm(x) @ self.wqkv[layer]  # [bs, (Hq + 2H) * D]
            q = (qkv[:, :nq] + self.q_bias[layer]).view(bs, s.qo_heads, s.head_dim)
            k = qkv[:, nq:nq + nkv].reshape(bs, s.kv_heads, s.head_dim)
            v = qkv[:, nq + nkv:].reshape(bs, s.kv_heads, s.head_dim)
            o = attn(layer, q, k, v)  # [bs, Hq, D]
            x = x + o.reshape(bs, nq) @ self.wo[layer]
            gu = rms_norm(x) @ self.wgu[layer]  # [bs, 2 * inter]
            x = x + (torch.nn.functional.silu(gu[:, :s.inter]) * gu[:, s.inter:]) @ self.wd[layer]
        return (rms_norm(x) @ self.wlm).float()


# ---------------------------------------------------------------------------- data
class Group:
    """One shared context and ``bs_max`` requests: the dense KV (context rows + per-request
    tails for two owners: 0 = the dense baseline, 1 = FreeKV's dense layers) and the step
    inputs. Tail of request b, owner o: rows ``ctx + (o * bs_max + b) * tail``..."""

    def __init__(self, s: Shapes, model: SyntheticModel, ctx: int, bs_max: int, tail: int,
                 steps: int, device: torch.device, seed: int, key_shift: float,
                 drift_rho: float, jump_prob: float) -> None:
        self.s, self.ctx, self.bs_max, self.tail = s, ctx, bs_max, tail
        self.suffix = [1 + (3 * b) % (s.page - 1) for b in range(bs_max)]  # own tokens
        gen = torch.Generator(device=device).manual_seed(seed)
        rows = ctx + 2 * bs_max * tail
        shape = (rows, s.kv_heads, s.head_dim)
        self.k, self.v = [], []
        pages = ctx // s.page
        for layer in range(s.layers):
            k = torch.empty(shape, dtype=s.dtype, device=device).normal_(generator=gen)
            v = torch.empty(shape, dtype=s.dtype, device=device).normal_(generator=gen)
            shift = torch.empty((pages, s.kv_heads), device=device).exponential_(generator=gen)
            shift *= key_shift * math.sqrt(s.head_dim)
            kc = k[:ctx].view(pages, s.page, s.kv_heads, s.head_dim)
            kc += (shift[:, None, :, None] * model.u[layer][None, None]).to(s.dtype)
            for b in range(bs_max):  # the suffix is the same for both owners
                n = self.suffix[b]
                for buf in (k, v):
                    buf[self.tail_row(1, b):self.tail_row(1, b) + n] = \
                        buf[self.tail_row(0, b):self.tail_row(0, b) + n]
            self.k.append(k)
            self.v.append(v)
        # rotation of the shared context per request (b = 0 unrotated)
        self.offset = [0] + [(int(ctx * ((b * 0.6180339887) % 1.0)) // s.page) * s.page
                             for b in range(1, bs_max)]
        # step inputs: AR(1) per request with jumps, [steps, bs_max, hidden]
        z = torch.randn((bs_max, s.hidden), generator=gen, device=device)
        xs = []
        for _ in range(steps):
            jump = torch.rand((bs_max, 1), generator=gen, device=device) < jump_prob
            rho = torch.where(jump, 0.3, drift_rho)
            z = rho * z + torch.sqrt(1 - rho * rho) * torch.randn(z.shape, generator=gen,
                                                                  device=device)
            xs.append(z.to(s.dtype))
        self.x = torch.stack(xs)
        self.rows: list[int] = []  # FreeKV request rows (once committed)
        self.n: list[int] = []  # FreeKV tokens with KV per request

    def tail_row(self, owner: int, b: int) -> int:
        return self.ctx + (owner * self.bs_max + b) * self.tail

    def table(self, owner: int, bs: int, ctx: int) -> torch.Tensor:
        """``[bs, ctx + tail]`` int32: request b's rotated context rows, then its tail."""
        out = []
        for b in range(bs):
            ctx_rows = (torch.arange(ctx) + self.offset[b] % ctx) % ctx
            tail = torch.arange(self.tail) + self.tail_row(owner, b)
            out.append(torch.cat([ctx_rows, tail]))
        return torch.stack(out).to(torch.int32)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ---------------------------------------------------------------------------- report
def plot_step(result: dict[str, Any]) -> Any:
    """TPOT per (context, batch), one bar per mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tpot_ms" in r]
    keys = sorted({(r["context"], r["batch"]) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.set_title(f"Decode step (TPOT), {result['device']}"
                 + (" [tiny]" if result["tiny"] else ", Llama-3.1-8B shapes, CUDA graph"),
                 fontsize=11)
    modes = [("dense", "default"), ("freekv", "freekv"), ("sync", "freekv_sync")]
    width = 0.8 / len(modes)
    for i, (mode, color_key) in enumerate(modes):
        xs, ys = [], []
        for j, key in enumerate(keys):
            hit = [r for r in rows if r["mode"] == mode and (r["context"], r["batch"]) == key]
            if hit:
                xs.append(j + (i - 1) * width)
                ys.append(hit[0]["tpot_ms"])
        bars = ax.bar(xs, ys, width, color=COLORS[color_key], label=LABELS[color_key])
        ax.bar_label(bars, labels=[f"{y:.2f}" if y < 100 else f"{y:.0f}" for y in ys],
                     fontsize=6, padding=1)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{c // 1024}K\nbs {b}" if c >= 1024 else f"{c}\nbs {b}"
                        for c, b in keys], fontsize=8)
    ax.set_ylabel("ms per step (one token per request)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, axis="y")
    ax.legend(fontsize=9)
    return fig


def print_table(result: dict[str, Any]) -> None:
    """The result table, targets and recall numbers on stdout."""
    print(f"\n{'mode':7} {'context':>8} {'bs':>3} {'tpot ms':>9} {'gpu ms':>8} {'plan ms':>8}"
          f" {'graph=eager':>11} {'blk/step':>9} {'turnover':>8} {'corr':>6}")
    for r in result["rows"]:
        if "tpot_ms" not in r:
            why = r.get("skipped") or r.get("error", "")
            print(f"{r['mode']:7} {r['context']:>8} {r['batch']:>3} -- {why[:90]}")
            continue
        corr = r.get("corrected_frac")
        print(f"{r['mode']:7} {r['context']:>8} {r['batch']:>3} {r['tpot_ms']:9.3f} "
              f"{r.get('gpu_step_ms', float('nan')):8.3f} {r['plan_ms']:8.2f} "
              f"{r.get('graph_check', {}).get('ok')!s:>11} "
              f"{r.get('recall_blocks_per_step', float('nan')):9.0f} "
              f"{r.get('turnover', float('nan')):8.2f} "
              f"{'-' if corr is None else f'{corr:.2f}':>6}")
    for k, v in result["targets"].items():
        print(f"target {k}: {v}")
    rc = result["recall"]
    print(f"recall_direct {rc.get('recall_direct_gbps')} GB/s, pinned H2D peak "
          f"{rc.get('h2d_pinned_peak_gbps')} GB/s")


# ---------------------------------------------------------------------------- timing
def time_events(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events), after one warm-up."""
    fn()
    # SYNC: benchmark timing, outside any measured step: the warm-up is done before timing
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()  # SYNC: read this repetition's time; not part of the step timed
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def time_wall(fn: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of ``fn`` (CPU dry runs: no CUDA events)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
