"""Prometheus metrics of FreeKV, per TP rank (exported at /metrics with --enable-metrics).

SGLang sets PROMETHEUS_MULTIPROC_DIR before spawning schedulers, so metrics created in a
scheduler process are aggregated by the HTTP server. Counters are fed with deltas of
``FreeKVServing.stats()`` once per forward and on every release; gauges use the
``mostrecent`` multiprocess mode so an idle server reads 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sglang_freekv.serving import FreeKVServing

COUNTERS = {
    "recall_bytes": ("sglang:freekv_recall_bytes", "Bytes recalled from the host tier"),
    "recalled_pages": ("sglang:freekv_recalled_pages", "(page, KV head) blocks recalled"),
    "checked_heads": ("sglang:freekv_checked_heads", "(request, KV head) drift checks"),
    "corrected_heads": ("sglang:freekv_corrected_heads", "(request, KV head) corrections"),
    "job_wait_ns": ("sglang:freekv_job_wait_seconds",
                    "Time the engine waited for speculative jobs (host side)"),
}
# Counters kept in other units by the serving core: the factor to the exported unit.
SCALE = {"job_wait_ns": 1e-9}
GAUGES = {
    "host_pages_used": ("sglang:freekv_host_pages_used",
                        "Host-tier pages held by requests in flight"),
    "host_pages_cached": ("sglang:freekv_host_pages_cached",
                          "Host-tier pages held only by the radix cache (prefix sharing)"),
    "device_pages_used": ("sglang:freekv_device_pages_used",
                          "Device pages (budget slots + prefill staging) held by requests"),
    "speculative_layers": ("sglang:freekv_speculative_layers",
                           "Sparse layers the speculative job serves (CPU engines: layers "
                           "that keep drifting leave it, see spec_drift_limit)"),
}


@dataclass
class FreeKVMetrics:
    tp_rank: int
    counters: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, tp_rank: int) -> FreeKVMetrics:
        from sglang.srt.runtime_context import get_observability

        out = cls(tp_rank)
        if not get_observability().enable_metrics:
            return out
        from prometheus_client import Counter, Gauge

        for key, (name, doc) in COUNTERS.items():
            out.counters[key] = Counter(name, doc, labelnames=["tp_rank"]).labels(
                tp_rank=str(tp_rank))
        for key, (name, doc) in GAUGES.items():
            out.gauges[key] = Gauge(name, doc, labelnames=["tp_rank"],
                                    multiprocess_mode="mostrecent").labels(tp_rank=str(tp_rank))
        return out

    def update(self, serving: FreeKVServing) -> None:
        """Push the serving core's counters (deltas) and usage gauges."""
        if not self.counters:
            return
        stats = serving.stats()
        for key, counter in self.counters.items():
            value = int(stats[key])
            delta = value - self.last.get(key, 0)
            if delta > 0:
                counter.inc(delta * SCALE.get(key, 1))
            self.last[key] = value
        usage = serving.usage()
        self.gauges["host_pages_used"].set(usage.host_pages_in_flight)
        self.gauges["host_pages_cached"].set(usage.host_pages_cached)
        self.gauges["device_pages_used"].set(usage.device_pages)
        self.gauges["speculative_layers"].set(int(stats.get("speculative_layers", 0)))
