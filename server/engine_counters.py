"""Counters the engine keeps on /metrics, read from the EngineStats of each scrape (the engine counts; the
Prometheus types live here)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily

COUNTERS = {  # EngineStats field -> (metric, help)
    "num_preemptions": (
        "ovis2_num_preemptions",
        "Running requests preempted (their KV blocks freed, recomputed later) for want of KV cache blocks.",
    ),
    "num_encoded_images": (
        "ovis2_vision_encoded_images",
        "Images and video frames the vision tower encoded (the visual cache serves the rest).",
    ),
}


class StatsCollector:
    """A Prometheus collector of values from the latest EngineStats (given to `update` on each scrape)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = None

    def update(self, stats) -> None:
        self.stats = stats

    def value(self, name: str) -> float:
        return float(getattr(self.stats, name, 0) or 0)


class EngineCounterCollector(StatsCollector):
    def collect(self):
        for field, (name, description) in COUNTERS.items():
            counter = CounterMetricFamily(name, description, labels=["model_name"])
            counter.add_metric([self.model_name], self.value(field))
            yield counter
