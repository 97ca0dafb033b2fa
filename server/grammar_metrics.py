"""The engine's grammar compiler on /metrics: compile time (a summary: count and sum) and cache hits, read from
the EngineStats of each scrape (the engine counts; Prometheus types live here)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily


class GrammarCollector:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = None  # the latest EngineStats

    def update(self, stats) -> None:
        self.stats = stats

    def collect(self):
        labels = [self.model_name]
        compiles = SummaryMetricFamily(
            "ovis2_grammar_compile_seconds",
            "Time compiling structured-output "
            "grammars (JSON schemas, regexes, choices, grammars), cache misses only.",
            labels=["model_name"],
        )
        compiles.add_metric(
            labels,
            count_value=self._value("num_grammar_compiles"),
            sum_value=self._value("grammar_compile_seconds"),
        )
        yield compiles
        hits = CounterMetricFamily(
            "ovis2_grammar_cache_hits",
            "Structured-output requests whose grammar was compiled already (or was being compiled).",
            labels=["model_name"],
        )
        hits.add_metric(labels, self._value("num_grammar_cache_hits"))
        yield hits

    def _value(self, name: str) -> float:
        return float(getattr(self.stats, name, 0) or 0)
