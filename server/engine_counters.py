"""Counters the engine keeps on /metrics, read from the EngineStats of each scrape (the engine counts; the
Prometheus types live here)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily

COUNTERS = {  # EngineStats field -> (metric, help)
    "num_preemptions": (
        "ovis2_num_preemptions",
        "Running requests preempted (their KV blocks freed, recomputed later) for want of KV cache blocks.",
    ),
}


class EngineCounterCollector:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = None  # the latest EngineStats

    def update(self, stats) -> None:
        self.stats = stats

    def collect(self):
        for field, (name, description) in COUNTERS.items():
            counter = CounterMetricFamily(name, description, labels=["model_name"])
            counter.add_metric([self.model_name], float(getattr(self.stats, field, 0) or 0))
            yield counter
