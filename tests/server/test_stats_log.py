"""server/stats_log.py: the periodic throughput line."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from server.stats_log import ThroughputLine, log_stats_forever


def stats(prompt=0, generated=0, running=0, waiting=0, usage=0.0, preemptions=0):
    return SimpleNamespace(
        num_prompt_tokens=prompt,
        num_generated_tokens=generated,
        num_running=running,
        num_waiting=waiting,
        kv_cache_usage=usage,
        num_preemptions=preemptions,
    )


def test_rates_are_since_the_previous_line_and_idle_is_quiet():
    line = ThroughputLine()
    assert line.line(stats(100, 10), 0.0, 0) is None  # the starting point
    text = line.line(stats(600, 210, running=3, waiting=1, usage=0.25, preemptions=2), 2.0, 5)
    assert text == (
        "prompt 250.0 tok/s, generation 100.0 tok/s, running 3, waiting 1, KV cache 25.0%, "
        "preemptions 2, image pixels in flight 5"
    )
    assert line.line(stats(600, 210), 4.0, 0) is None  # nothing ran, nothing waits


def test_the_server_task_logs_while_busy(caplog):
    class Engine:
        stats = stats()

    state = SimpleNamespace(engine=Engine(), images=SimpleNamespace(budget=SimpleNamespace(in_use=0)))

    async def run():
        task = asyncio.create_task(log_stats_forever(state, 0.05))
        await asyncio.sleep(0.01)
        state.engine.stats = stats(50, 20, running=2)
        await asyncio.sleep(0.08)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="ovis2.server"):
        asyncio.run(run())
    assert any("generation" in r.message and "running 2" in r.message for r in caplog.records)
