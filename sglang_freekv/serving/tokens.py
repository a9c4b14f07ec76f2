"""TokenMap: which host-tier slot holds the KV of each logical token id (prefix sharing).

The serving engine (SGLang) names every token's KV by a *logical id* (``req_to_token``); its
radix cache keeps ids of finished requests to share prefixes. FreeKV keeps the KV itself in
the host tier, so each committed id maps to a host *slot* ``page * P + offset``. Each mapped
id holds one reference on its host page, dropped when the engine frees the id: pages the
radix cache still points at outlive their request. Host state only (cpu tensors).
"""

from __future__ import annotations

import torch

from sglang_freekv.pool_host import FreeKVHostPool

__all__ = ["TokenMap"]


class TokenMap:
    """``slot[id]`` = host slot of logical ``id`` (-1: none), with page references.

    Parameters
    ----------
    num_ids : logical ids the engine hands out (``max_total_tokens`` + padding).
    host : the host tier whose pages are referenced.
    """

    def __init__(self, num_ids: int, host: FreeKVHostPool) -> None:
        self.host = host
        self.page_size = host.page_size
        self.slot = torch.full((num_ids,), -1, dtype=torch.int64)  # [num_ids] cpu

    @property
    def num_mapped(self) -> int:
        return int((self.slot >= 0).sum())

    def map(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Point logical ``ids`` at host ``slots`` (``[n]`` ints, any device; entries with
        slot -1 are skipped). Takes one page reference per id; an id that was mapped
        already drops its old reference (the engine reused it)."""
        ids, slots = ids.to("cpu", torch.int64), slots.to("cpu", torch.int64)
        keep = slots >= 0
        ids, slots = ids[keep], slots[keep]
        if ids.numel() == 0:
            return
        self._check(ids)
        old = self.slot[ids]
        self.host.incref(slots // self.page_size)  # before the old drop: same page stays
        self.slot[ids] = slots
        self.host.decref(old[old >= 0] // self.page_size)

    def unmap(self, ids: torch.Tensor) -> int:
        """The engine freed logical ``ids`` (any ints; out-of-range and unmapped ids are
        ignored): drop their references. Returns the number of host pages freed."""
        ids = ids.to("cpu", torch.int64)
        ids = ids[(ids >= 0) & (ids < self.slot.numel())]
        if ids.numel() == 0:
            return 0
        slots = self.slot[ids]
        self.slot[ids] = -1
        return self.host.decref(slots[slots >= 0] // self.page_size)

    def unmap_all(self) -> int:
        """Every id is free (the engine cleared its allocator); returns pages freed."""
        return self.unmap(torch.nonzero(self.slot >= 0).flatten())

    def slots_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Host slots of ``ids`` (``[n]`` int64 cpu, -1 where unmapped)."""
        ids = ids.to("cpu", torch.int64)
        self._check(ids)
        return self.slot[ids]

    def shared_pages(self, ids: torch.Tensor) -> torch.Tensor:
        """Host pages that hold whole leading pages of a token-id sequence.

        ``ids``: ``[f * P]`` logical ids of the first ``f`` full pages of a matched prefix.
        A page is shareable when its ``P`` ids map, in order, to one host page; the run stops
        at the first page that is not. Returns ``[f']`` int64 (cpu) host page ids.
        """
        p = self.page_size
        f = int(ids.numel()) // p
        if f == 0:
            return torch.empty(0, dtype=torch.int64)
        s = self.slots_of(ids[: f * p]).view(f, p)
        ok = (s[:, 0] >= 0) & (s[:, 0] % p == 0)
        ok &= (s == s[:, :1] + torch.arange(p)).all(1)
        run = int(ok.to(torch.int64).cumprod(0).sum())
        return s[:run, 0] // p

    def _check(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.slot.numel()):
            raise ValueError(f"TokenMap: logical id out of range [0, {self.slot.numel()})")
