"""A server with a small batch and a small waiting queue: a burst past the queue gets 503s at once while the
admitted requests complete; then SIGTERM under load finishes every in-flight request within the grace period and
exits 0. One short-lived server for this module; the SIGTERM test stops it, so it runs last."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.live_server import LiveServer
from tests.reliability.conftest import async_client, run, stream_chat, text_messages

MAX_RUNNING = 2
MAX_WAITING = 4
GRACE_SECONDS = 20
TOKENS = 96  # long enough that the whole burst is answered or refused while the first requests still run
SIGTERM_TOKENS = 160  # ~1.5 s a batch on 2 CPU cores: the whole queue is in flight when SIGTERM comes


@pytest.fixture(scope="module")
def small_queue_server():
    server = LiveServer(
        [
            "--max-num-seqs",
            str(MAX_RUNNING),
            "--max-waiting-requests",
            str(MAX_WAITING),
            "--shutdown-grace-seconds",
            str(GRACE_SECONDS),
        ]
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def long_body(i: int, tokens: int = TOKENS) -> dict:
    return {"messages": text_messages(f"Request {i}: go on"), "max_tokens": tokens, "ignore_eos": True}


async def timed(coro):
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


def test_past_the_waiting_queue_requests_get_503_at_once_and_the_rest_complete(small_queue_server):
    server = small_queue_server

    async def burst():
        async with async_client() as client:
            calls = [
                stream_chat(client, server.chat_url, long_body(i))
                if i % 2
                else client.post(server.chat_url, json=long_body(i))
                for i in range(24)
            ]
            return await asyncio.gather(*(timed(call) for call in calls))

    results = run(burst())
    completed, rejected = [], []
    for result, seconds in results:
        if isinstance(result, httpx.Response):
            status, body = result.status_code, result.content
            if status == 200:
                assert result.json()["usage"]["completion_tokens"] == TOKENS
        else:
            status, body = result.status, result.body
            if status == 200:
                result.assert_ok()
        if status == 503:
            error = httpx.Response(503, content=body).json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "service_unavailable_error" and error["code"] == "overloaded", error
            rejected.append(seconds)
        else:
            assert status == 200, (status, body[:300])
            completed.append(seconds)
    assert rejected, "nothing was refused"
    assert len(completed) >= MAX_WAITING, (len(completed), len(rejected))  # the queue, at least, was served
    # At once, not after queueing: a refusal that had waited for a slot would come after an admitted request ended.
    # (Held against the server's own speed: on a fast CPU the admitted requests end in ~0.6 s.)
    assert max(rejected) < min(completed), (rejected, completed)
    m = server.wait_idle()
    assert m["ovis2_kv_cache_free_blocks"] == m["ovis2_kv_cache_total_blocks"]
    # Once the queue drains, the server takes requests again.
    response = httpx.post(server.chat_url, json={"messages": text_messages(), "max_tokens": 2}, timeout=30)
    assert response.status_code == 200, response.text


def test_sigterm_under_load_finishes_in_flight_requests_then_exits_0(small_queue_server):
    """Runs last: it stops this module's server."""
    server = small_queue_server
    num_requests = MAX_RUNNING + MAX_WAITING

    async def admitted(running: int, waiting: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = await asyncio.to_thread(server.metrics)
            if m["ovis2_num_requests_running"] >= running and m["ovis2_num_requests_waiting"] >= waiting:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never saw {running} running and {waiting} waiting")

    async def load_then_sigterm():
        async with async_client() as client:

            def call(i: int):
                body = long_body(i, SIGTERM_TOKENS)
                return asyncio.create_task(
                    stream_chat(client, server.chat_url, body)
                    if i % 2
                    else client.post(server.chat_url, json=body)
                )

            calls = [call(i) for i in range(MAX_RUNNING)]  # a full batch first, then a full queue behind it
            await admitted(MAX_RUNNING, 0)
            calls += [call(i) for i in range(MAX_RUNNING, num_requests)]
            await admitted(MAX_RUNNING, MAX_WAITING)
            server.process.terminate()
            terminated = time.monotonic()
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.HTTPError):  # no longer accepting
                await client.get(server.base_url + "/health", timeout=2)
            results = await asyncio.gather(*calls)
            return_code = await asyncio.to_thread(server.process.wait, GRACE_SECONDS + 10)
            return results, return_code, time.monotonic() - terminated

    results, return_code, seconds = run(load_then_sigterm())
    assert return_code == 0, server.logs()
    assert seconds < GRACE_SECONDS, seconds
    for i, result in enumerate(results):
        if i % 2:
            result.assert_ok()
            assert result.finish_reasons == ["length"], result.events
        else:
            assert result.status_code == 200, result.text
            assert result.json()["usage"]["completion_tokens"] == SIGTERM_TOKENS


def test_requests_still_running_past_the_grace_period_get_503s_in_the_envelope_then_exit_0():
    """Its own server, with a 1 s grace period and answers far longer than that."""
    server = LiveServer(["--shutdown-grace-seconds", "1"]).wait_ready()
    body = {"messages": text_messages("go on for a long time"), "max_tokens": 3000, "ignore_eos": True}

    async def load_then_sigterm():
        async with async_client() as client:
            streamed = asyncio.create_task(stream_chat(client, server.chat_url, body))
            whole = asyncio.create_task(client.post(server.chat_url, json=body))
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(server.metrics))["ovis2_num_requests_running"] < 2:
                assert time.monotonic() < deadline, "the two requests never ran together"
                await asyncio.sleep(0.05)
            server.process.terminate()
            terminated = time.monotonic()
            results = await asyncio.gather(streamed, whole)
            return_code = await asyncio.to_thread(server.process.wait, 30)
            return results, return_code, time.monotonic() - terminated

    try:
        (streamed, whole), return_code, seconds = run(load_then_sigterm())
    finally:
        server.stop()
    assert return_code == 0 and seconds < 1 + 5, (return_code, seconds)
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "engine_dead", whole.text
    assert streamed.status == 200 and streamed.done and not streamed.finish_reasons, streamed.events
    assert streamed.errors == [
        {
            "message": "the inference engine is not running",
            "type": "service_unavailable_error",
            "param": None,
            "code": "engine_dead",
        }
    ]
    assert "Traceback" not in server.logs()
