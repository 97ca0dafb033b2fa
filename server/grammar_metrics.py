"""The engine's grammar compiler on /metrics: compile time (a summary: count and sum) and cache hits, read from
the EngineStats of each scrape (the engine counts; Prometheus types live here)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

from .engine_counters import StatsCollector


class GrammarCollector(StatsCollector):
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
            count_value=self.value("num_grammar_compiles"),
            sum_value=self.value("grammar_compile_seconds"),
        )
        yield compiles
        hits = CounterMetricFamily(
            "ovis2_grammar_cache_hits",
            "Structured-output requests whose grammar was compiled already (or was being compiled).",
            labels=["model_name"],
        )
        hits.add_metric(labels, self.value("num_grammar_cache_hits"))
        yield hits
