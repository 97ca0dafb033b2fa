"""A periodic log line with the engine's throughput and load, for operators who read logs rather than /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("ovis2.server")


@dataclass
class ThroughputLine:
    """Turns successive engine stats into 'since the last line' rates; quiet when nothing ran or waited."""

    last_time: float | None = None
    last_prompt: int = 0
    last_generated: int = 0

    def line(self, stats, now: float, pixels_in_flight: int) -> str | None:
        prompt, generated = stats.num_prompt_tokens, stats.num_generated_tokens
        previous = self.last_time
        self.last_time, self.last_prompt, delta_prompt = now, prompt, prompt - self.last_prompt
        self.last_generated, delta_generated = generated, generated - self.last_generated
        if previous is None or now <= previous:
            return None
        if not (delta_prompt or delta_generated or stats.num_running or stats.num_waiting):
            return None
        elapsed = now - previous
        return (
            f"prompt {delta_prompt / elapsed:.1f} tok/s, generation {delta_generated / elapsed:.1f} tok/s, "
            f"running {stats.num_running}, waiting {stats.num_waiting}, KV cache {stats.kv_cache_usage:.1%}, "
            f"preemptions {stats.num_preemptions}, image pixels in flight {pixels_in_flight}"
        )


async def log_stats_forever(state, interval: float) -> None:
    throughput = ThroughputLine()
    throughput.line(state.engine.stats, time.monotonic(), state.images.budget.in_use)  # the starting point
    while True:
        await asyncio.sleep(interval)
        line = throughput.line(state.engine.stats, time.monotonic(), state.images.budget.in_use)
        if line is not None:
            logger.info(line)
