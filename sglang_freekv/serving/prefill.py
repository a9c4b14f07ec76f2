"""Prefill through a one-layer scratch, written through to the host tier layer by layer.

A prompt's K/V of the sparse layers never occupies device rows of every layer: each sparse
layer, in turn, gets its own copy of the batch's prefixes (a radix-cache match, or the earlier
chunks of a chunked prefill) loaded from the host tier into a scratch buffer of one layer,
next to the new tokens' K/V; the engine's attention backend reads that scratch; then every
host page the new tokens touch is written from the scratch (HND blocks) and the digests of the
pages completed are built. So device memory for prefill is one layer's prefix plus the chunk,
whatever the prompt's length and the number of layers, and attention stays exact (the prefix
is read back bit for bit). Budget slots are filled from the host tier when the request
decodes for the first time (``FreeKVServing._activate``).

Host pages of a request: the leading whole pages of a matched prefix whose ids map, in order,
to one host page are shared (a reference, their digests reused); every other page the request
writes is its own, allocated for it (the page where a radix match ends included: written whole
from the scratch, the prefix part read back from the host tier), so no cached sequence ever
changes. A chunk continues its request's own partial last page in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang_freekv.serving.core import FreeKVServing

__all__ = ["ExtendStep", "FreeKVStagingFull", "plan_extend_step", "run_extend_layer"]


class FreeKVStagingFull(RuntimeError):
    """The prefill scratch has fewer rows than a forward needs (one-line message)."""


@dataclass(slots=True)
class ExtendStep:
    """Plan of one extend (prefill or chunk) forward; device tensors on the KV device."""

    # fmt: off
    req_rows: list[int]             # request rows, batch order
    seq_lens: list[int]             # prefix + new tokens per request
    prefix_lens: list[int]          # tokens already prefilled or matched (radix cache)
    table: torch.Tensor             # [bs, max(seq_lens)] int32: scratch row per position
    out_rows: torch.Tensor          # [num_new] int64: scratch row of each new token
    prefix_rows: torch.Tensor       # [np] int64: scratch rows of the prefix tokens
    prefix_slots: torch.Tensor      # [np] int64 cpu: their host slots (page * P + offset)
    page_ids: torch.Tensor          # [nw] int64 cpu: host pages written by this forward
    page_rows: torch.Tensor         # [nw] int64: scratch row of each page's first position
    page_full: torch.Tensor         # [nw] bool cpu: the page is complete after this forward
    new_ids: torch.Tensor           # [num_new] int64 cpu: the new tokens' logical ids
    new_slots: torch.Tensor         # [num_new] int64 cpu: their host slots
    # fmt: on


def plan_extend_step(
    s: FreeKVServing,
    rows: list[int],
    lens: list[int],
    prefixes: list[int],
    out_loc: torch.Tensor,
    req_to_token: torch.Tensor,
) -> ExtendStep:
    """Host-side plan of an extend: scratch layout, host pages (allocated here), prefix slots.
    Raises :class:`FreeKVStagingFull` or ``FreeKVHostPoolFull`` before changing anything."""
    cache, tokens = s.cache, s.tokens
    p = cache.g.page_size
    total = sum(lens)
    if total > s.scratch_rows:
        raise FreeKVStagingFull(
            f"freekv: the prefill scratch holds {s.scratch_rows} tokens, this forward needs "
            f"{total} (prefixes included); lower --chunked-prefill-size or "
            "--max-prefill-tokens")
    # The step's own copy: the engine owns out_loc, and commit_extend reads the ids at the
    # forward's end (a CPU engine's ``.to`` would return out_loc itself; see race 10).
    new_ids = out_loc.to("cpu", torch.int64, copy=True)
    tbl = cache.t.host_pages_cpu
    # 1. per request: prefix slots, shared prefix pages, the pages to write
    plans = []
    need = 0
    for row, n, m in zip(rows, lens, prefixes):
        if n > tbl.shape[1] * p:
            raise ValueError(f"freekv: a {n}-token request exceeds the longest request "
                             f"({tbl.shape[1] * p} tokens)")
        ids = req_to_token[row, :m].to("cpu", torch.int64)
        slots = tokens.slots_of(ids)
        if bool((slots < 0).any()):
            raise RuntimeError("freekv: a prefix token has no host-tier copy")
        own = s.own_pages.get(row)
        if own is None:  # a fresh request: share the leading whole pages of its prefix
            shared = tokens.shared_pages(ids[: m // p * p])
            first_write = int(shared.numel())
        else:  # a chunk of a request prefilled before: its pages so far are its own
            shared = torch.empty(0, dtype=torch.int64)
            first_write = m // p
        last = (n - 1) // p
        mine = set() if own is None else own
        need += sum(1 for pg in range(first_write, last + 1) if int(tbl[row, pg]) not in mine)
        plans.append((row, n, m, slots, shared, first_write, last))
    s.ensure_host_pages(need)
    if need > cache.host.free_pages:  # nothing changed yet: a clean refusal
        cache.host.alloc(-1, need)  # raises FreeKVHostPoolFull with the numbers
    # 2. apply: page tables, scratch layout
    table = torch.zeros((len(rows), max(lens, default=0)), dtype=torch.int64)
    out_rows, prefix_rows, prefix_slots = [], [], []
    page_ids, page_rows, page_full, new_slots = [], [], [], []
    off = 0
    for b, (row, n, m, slots, shared, first_write, last) in enumerate(plans):
        own = s.own_pages.setdefault(row, set())
        if shared.numel():
            cache.host.incref(shared)
            tbl[row, : shared.numel()] = shared.to(torch.int32)
        todo = [pg for pg in range(first_write, last + 1) if int(tbl[row, pg]) not in own]
        fresh = cache.host.alloc(row, len(todo))  # fits: checked above
        for pg, new in zip(todo, fresh.tolist()):
            old = int(tbl[row, pg])
            if old >= 0:  # a page of the row it does not own: drop the row's reference
                cache.host.decref(torch.tensor([old]))
            tbl[row, pg] = new
            own.add(new)
        table[b, :n] = off + torch.arange(n)  # request b's positions, contiguous in scratch
        prefix_rows.append(off + torch.arange(m))
        prefix_slots.append(slots)
        out_rows.append(off + torch.arange(m, n))
        pages = torch.arange(first_write, last + 1)
        page_ids.append(tbl[row, pages].to(torch.int64))
        page_rows.append(off + pages * p)
        page_full.append((pages + 1) * p <= n)
        q = torch.arange(m, n)
        new_slots.append(tbl[row, q // p].to(torch.int64) * p + q % p)
        off += n
    dev = s.device
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.int64)  # noqa: E731
    return ExtendStep(
        req_rows=list(rows), seq_lens=list(lens), prefix_lens=list(prefixes),
        table=table.to(dev, torch.int32), out_rows=cat(out_rows).to(dev),
        prefix_rows=cat(prefix_rows).to(dev), prefix_slots=cat(prefix_slots),
        page_ids=cat(page_ids), page_rows=cat(page_rows).to(dev),
        page_full=torch.cat(page_full) if page_full else torch.empty(0, dtype=torch.bool),
        new_ids=new_ids, new_slots=cat(new_slots))


def run_extend_layer(s: FreeKVServing, layer: int, step: ExtendStep, k: torch.Tensor,
                     v: torch.Tensor) -> None:
    """Before attention of sparse ``layer``: the prefixes from the host tier and the new
    tokens' K/V (``[num_new, H, D]``) into the scratch."""
    sk, sv = s.scratch_k, s.scratch_v
    if step.prefix_rows.numel():
        pk, pv = s.cache.load_tokens(layer, step.prefix_slots)  # [np, H, D] each
        sk[step.prefix_rows] = pk
        sv[step.prefix_rows] = pv
    sk[step.out_rows] = k.to(sk.dtype)
    sv[step.out_rows] = v.to(sv.dtype)


def write_extend_layer(s: FreeKVServing, layer: int, step: ExtendStep) -> None:
    """After attention of sparse ``layer``: the pages the new tokens touched to the host tier
    (a partial last page too: a later chunk, or the first decode step, reads it back) and the
    digests of the complete ones."""
    from sglang_freekv.kernels.digest import page_digest
    from sglang_freekv.kernels.scatter import backup_gather

    if step.page_ids.numel() == 0:
        return
    cache, p = s.cache, s.cache.g.page_size
    blocks = backup_gather(s.scratch_k, s.scratch_v, step.page_rows, p)  # [nw, H, 2, P, D]
    cache.host.write_blocks(layer, step.page_ids, blocks)
    full = step.page_full
    if bool(full.any()):
        rows = step.page_rows[full.to(step.page_rows.device)]
        dig = page_digest(s.scratch_k, rows, p)  # [nf, H, 2, D]
        cache.digests[layer].index_copy_(0, step.page_ids[full].to(cache.device), dig)
