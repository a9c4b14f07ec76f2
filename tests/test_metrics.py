"""FreeKVMetrics pushes counter deltas in the exported units (no server, fake instruments)."""

from __future__ import annotations

from typing import Any

from sglang_freekv.patches.freekv_metrics import COUNTERS, GAUGES, FreeKVMetrics
from sglang_freekv.serving.core import ServingUsage


class _Instrument:
    def __init__(self) -> None:
        self.total = 0.0
        self.value = 0.0

    def inc(self, amount: float) -> None:
        self.total += amount

    def set(self, value: float) -> None:
        self.value = value


class _Serving:
    def __init__(self) -> None:
        self.counters = {key: 0 for key in COUNTERS}

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    def usage(self) -> ServingUsage:
        return ServingUsage(host_pages_in_flight=3, host_pages_cached=2, device_pages=1)


def test_counters_are_pushed_as_deltas_in_their_units() -> None:
    m = FreeKVMetrics(tp_rank=0)
    m.counters = {key: _Instrument() for key in COUNTERS}
    m.gauges = {key: _Instrument() for key in GAUGES}
    serving = _Serving()
    serving.counters.update(recalled_pages=10, job_wait_ns=1_500_000_000)
    m.update(serving)  # type: ignore[arg-type]
    serving.counters.update(recalled_pages=25, job_wait_ns=2_000_000_000)
    m.update(serving)  # type: ignore[arg-type]
    assert m.counters["recalled_pages"].total == 25
    assert abs(m.counters["job_wait_ns"].total - 2.0) < 1e-9  # seconds
    assert m.gauges["host_pages_used"].value == 3
    assert COUNTERS["job_wait_ns"][0] == "sglang:freekv_job_wait_seconds"
