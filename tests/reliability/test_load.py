"""Load and disconnects against the real server: 256 concurrent streams (half with images) twice, with the
server's RSS sampled throughout; then 100 clients that drop mid-stream."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx

from server.app import IDLE_TRIM_QUIET_SECONDS
from tests.reliability.conftest import (
    assert_all_free,
    async_client,
    image_messages,
    run,
    small_image_url,
    stream_chat,
    text_messages,
)

NUM_STREAMS = 256
MAX_RSS_GROWTH = 1536 * 1024 * 1024  # a generous bound: the demo model's whole server is ~1.3 GB
MAX_GROWTH_BETWEEN_WAVES = 256 * 1024 * 1024


class RSSSampler:
    """The server's RSS every 50 ms, in a thread, while a block runs."""

    def __init__(self, server) -> None:
        self.server, self.samples, self._stop = server, [], threading.Event()

    def __enter__(self) -> RSSSampler:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.server.rss_bytes())
            self._stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.samples.append(self.server.rss_bytes())


async def wave(url: str, n: int) -> list:
    async with async_client() as client:
        bodies = [
            {
                "messages": image_messages(small_image_url(i), f"Picture {i}?")
                if i % 2
                else text_messages(f"Say something about the number {i}."),
                "max_tokens": 1 + i % 4,
                "stream_options": {"include_usage": True},
            }
            for i in range(n)
        ]
        return await asyncio.gather(*(stream_chat(client, url, body) for body in bodies))


def test_256_concurrent_streams_complete_and_memory_stays_bounded(reliability_server):
    server = reliability_server
    server.wait_idle()
    baseline = server.rss_bytes()
    peaks, after = [], []
    for _ in range(2):
        with RSSSampler(server) as sampler:
            started = time.monotonic()
            results = run(wave(server.chat_url, NUM_STREAMS))
            seconds = time.monotonic() - started
        for i, result in enumerate(results):
            result.assert_ok()
            usage = result.events[-1]["usage"]
            assert usage["completion_tokens"] == 1 + i % 4 or result.finish_reasons == ["stop"], usage
            assert (usage["prompt_tokens_details"]["image_tokens"] > 0) == bool(i % 2), usage
        assert seconds < 90, seconds
        assert_all_free(server.wait_idle())
        time.sleep(IDLE_TRIM_QUIET_SECONDS + 1.0)  # the server hands freed heap pages back once quiet
        peaks.append(max(sampler.samples))
        after.append(server.rss_bytes())
    assert max(peaks) - baseline < MAX_RSS_GROWTH, (baseline, peaks, after)
    assert after[1] - after[0] < MAX_GROWTH_BETWEEN_WAVES, (baseline, peaks, after)  # no growth trend
    assert peaks[1] - peaks[0] < MAX_GROWTH_BETWEEN_WAVES, (baseline, peaks, after)
    assert httpx.get(server.base_url + "/health").status_code == 200


async def drop_mid_stream(client: httpx.AsyncClient, url: str, body: dict, keep_chunks: int) -> int:
    """Read `keep_chunks` content chunks, then close the connection; returns how many were read."""
    seen = 0
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                seen += 1
                if seen >= keep_chunks:
                    break
    return seen


def test_100_clients_that_drop_mid_stream_free_every_kv_block(reliability_server):
    server = reliability_server
    before = server.wait_idle()
    aborted_before = before.get('ovis2_requests_total{finished_reason="abort"}', 0.0)
    rng = random.Random(7)

    async def drop_all() -> list[int]:
        # A fresh connection each (no keep-alive pool), so leaving the stream early really drops the connection.
        async with async_client(keepalive=False) as client:
            bodies = [
                {
                    "messages": image_messages(small_image_url(i))
                    if i % 3 == 0
                    else text_messages(f"Essay {i}"),
                    "max_tokens": 2000,
                    "ignore_eos": True,
                }
                for i in range(100)
            ]
            return await asyncio.gather(
                *(drop_mid_stream(client, server.chat_url, body, rng.randint(1, 6)) for body in bodies)
            )

    seen = run(drop_all())
    assert all(n >= 1 for n in seen)
    after = server.wait_idle(timeout=30)
    assert_all_free(after)
    assert after['ovis2_requests_total{finished_reason="abort"}'] - aborted_before == 100
    assert httpx.get(server.base_url + "/health").status_code == 200
    response = httpx.post(server.chat_url, json={"messages": text_messages(), "max_tokens": 2}, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
