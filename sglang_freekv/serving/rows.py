"""Device rows of the sparse layers: budget slots per running request and prefill staging.

Every sparse layer's ``k_buffer`` / ``v_buffer`` has :attr:`DeviceRows.total` rows (NHD):
``[0, budget_rows)`` are the budget slots, one chunk of ``budget`` contiguous rows per
running request (its ``budget_pages`` slots of ``page_size`` rows); ``[budget_rows, total)``
hold prompts being prefilled (and matched prefixes loaded from the host tier) until their
first decode step; the last ``page_size`` rows (``scratch_row`` on) are scratch that padded
lanes of the device step write and read. The same row ids serve every sparse layer. Both allocators keep their
state on the host: handing rows out never touches the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BudgetSlots", "DeviceRows", "StagingRows"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRows:
    """Row layout of the sparse layers' device buffers."""

    budget: int  # rows per running request (sink + retrieved + window)
    max_reqs: int  # budget chunks (one per request row that may run)
    staging_rows: int  # prefill staging rows
    page_size: int  # scratch rows after the staging rows

    @property
    def budget_rows(self) -> int:
        return self.max_reqs * self.budget

    @property
    def total(self) -> int:
        """End of the staging rows (= ``scratch_row``)."""
        return self.budget_rows + self.staging_rows

    @property
    def scratch_row(self) -> int:
        return self.total

    @property
    def buffer_rows(self) -> int:
        """Rows of each sparse layer's buffer (budget + staging + scratch)."""
        return self.total + self.page_size


class StagingRows:
    """Free mask over device rows ``[start, end)``, handed out one token row at a time."""

    def __init__(self, start: int, end: int) -> None:
        if end < start:
            raise ValueError(f"StagingRows: end ({end}) < start ({start})")
        self.start = start
        self.size = end - start
        self._free = torch.ones(self.size, dtype=torch.bool)  # cpu
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.size - self._used

    def alloc(self, n: int) -> torch.Tensor | None:
        """``[n]`` int64 rows (cpu, lowest free first), or None when fewer are free."""
        if n > self.free:
            return None
        idx = torch.nonzero(self._free).flatten()[:n]  # cpu
        self._free[idx] = False
        self._used += n
        return idx + self.start

    def release(self, rows: torch.Tensor) -> None:
        """Return ``rows`` (``[n]`` int64, any device); ValueError if one is not in use."""
        idx = rows.to("cpu", torch.int64) - self.start
        if idx.numel() == 0:
            return
        if bool(((idx < 0) | (idx >= self.size)).any()) or bool(self._free[idx].any()):
            raise ValueError("StagingRows.release: a row is out of range or already free")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("StagingRows.release: a row is released twice")
        self._free[idx] = True
        self._used -= int(idx.numel())


class BudgetSlots:
    """Free list of budget chunks: ``count`` chunks of ``budget`` rows from row 0."""

    def __init__(self, count: int, budget: int) -> None:
        self.budget = budget
        self.count = count
        self._free = list(range((count - 1) * budget, -1, -budget))  # pop() gives row 0 first

    @property
    def used(self) -> int:
        return self.count - len(self._free)

    def alloc(self) -> int | None:
        """First row of a free chunk, or None when every chunk is in use."""
        return self._free.pop() if self._free else None

    def release(self, first_row: int) -> None:
        if first_row % self.budget or not 0 <= first_row < self.count * self.budget:
            raise ValueError(f"BudgetSlots.release: {first_row} is not a chunk start")
        if first_row in self._free:
            raise ValueError(f"BudgetSlots.release: chunk {first_row} is already free")
        self._free.append(first_row)
