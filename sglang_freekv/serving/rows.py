"""Device rows of the sparse layers: budget slots per running request and a scratch page.

Every sparse layer's ``k_buffer`` / ``v_buffer`` has :attr:`DeviceRows.buffer_rows` rows (NHD):
``[0, budget_rows)`` are the budget slots, one chunk of ``budget`` contiguous rows per
running request (its ``budget_pages`` slots of ``page_size`` rows); the last ``page_size``
rows (``scratch_row`` on) are scratch that padded lanes of the device step write and read.
The same row ids serve every sparse layer. Prompts never take rows here: they go through the
one-layer prefill scratch (``prefill.py``). The allocator keeps its state on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BudgetSlots", "DeviceRows"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRows:
    """Row layout of the sparse layers' device buffers."""

    budget: int  # rows per running request (sink + retrieved + window)
    max_reqs: int  # budget chunks (one per request row that may run)
    page_size: int  # scratch rows after the budget chunks

    @property
    def budget_rows(self) -> int:
        return self.max_reqs * self.budget

    @property
    def scratch_row(self) -> int:
        return self.budget_rows

    @property
    def buffer_rows(self) -> int:
        """Rows of each sparse layer's buffer (budget chunks + scratch page)."""
        return self.budget_rows + self.page_size


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
