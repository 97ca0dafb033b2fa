"""Turn per-request timings into the figures users compare: throughput, latency percentiles, goodput."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .client import RequestResult

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")  # goodput targets, in milliseconds


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"goodput target must be one of {SLO_METRICS} as NAME:MS, not {item!r}")
        slos[name] = float(value)
    return slos


def distribution(values_s: list[float], name: str) -> dict[str, float]:
    """mean, p50, p90, p99 of a list of seconds, reported in milliseconds."""
    values_ms = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    stats = {f"mean_{name}_ms": float(values_ms.mean())}
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = float(np.percentile(values_ms, p))
    return stats


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    observed_ms = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.latency}
    return all(observed_ms[name] * 1000.0 <= limit for name, limit in slos.items())


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.success).most_common(5)),
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "total_cached_prompt_tokens": sum(r.cached_prompt_tokens for r in ok),
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (output_tokens + prompt_tokens) / duration if duration > 0 else 0.0,
    }
    summary |= distribution([r.ttft for r in ok], "ttft")
    summary |= distribution([r.tpot for r in ok if r.tpot is not None], "tpot")
    summary |= distribution([gap for r in ok for gap in r.itl], "itl")
    summary |= distribution([r.latency for r in ok], "e2el")
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        summary["goodput_slos_ms"] = dict(slos)
        summary["goodput"] = good / duration if duration > 0 else 0.0
    return summary
