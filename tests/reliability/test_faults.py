"""Faults stay with the request that has them: an exception injected into one request's processing in the engine
(tests/reliability/fault_server.py) and an image server that is too slow each fail that request alone."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.reliability.conftest import (
    FETCH_TIMEOUT,
    assert_all_free,
    async_client,
    image_messages,
    run,
    small_image_url,
    stream_chat,
    text_messages,
)
from tests.reliability.fault_server import FAULT_SEED


def good_bodies(n: int) -> list[dict]:
    return [
        {
            "messages": image_messages(small_image_url(i)) if i % 2 else text_messages(f"Count to {i}"),
            "max_tokens": 4,
            "temperature": 0.7,
            "seed": i,
        }
        for i in range(n)
    ]


def test_an_exception_in_one_requests_processing_fails_that_request_only(reliability_server):
    server = reliability_server
    before = server.wait_idle()
    errors_before = before.get('ovis2_requests_total{finished_reason="error"}', 0.0)
    faulty_text = {
        "messages": text_messages("Tell me a story"),
        "max_tokens": 8,
        "temperature": 0.7,
        "seed": FAULT_SEED,
    }
    faulty_image = {**faulty_text, "messages": image_messages(small_image_url(3))}

    async def scenario():
        async with async_client() as client:
            good = [stream_chat(client, server.chat_url, body) for body in good_bodies(16)]
            good += [client.post(server.chat_url, json=body) for body in good_bodies(8)]
            bad = [
                client.post(server.chat_url, json=faulty_text),
                client.post(server.chat_url, json=faulty_image),
                stream_chat(client, server.chat_url, faulty_text),
            ]
            return await asyncio.gather(*good), await asyncio.gather(*bad)

    good, (bad_text, bad_image, bad_stream) = run(scenario())
    for result in good[:16]:
        result.assert_ok()
    for response in good[16:]:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for response in (bad_text, bad_image):
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "internal_server_error"
        assert "injected" not in response.text and "secret" not in response.text  # no internals leak
    # A stream fails with a 500 before its headers or, once started, with an error event and no finish reason.
    if bad_stream.status == 200:
        assert bad_stream.errors and bad_stream.done and not bad_stream.finish_reasons, bad_stream.events
        assert "injected" not in str(bad_stream.events)
    else:
        assert bad_stream.status == 500 and b"injected" not in bad_stream.body
    after = server.wait_idle()
    assert_all_free(after)
    assert after['ovis2_requests_total{finished_reason="error"}'] - errors_before == 3
    assert httpx.get(server.base_url + "/health").status_code == 200
    # The same prompt without the fault succeeds: the engine is unharmed.
    response = httpx.post(server.chat_url, json={**faulty_image, "seed": 1}, timeout=60)
    assert response.status_code == 200, response.text


def test_a_slow_image_server_times_out_that_request_only(reliability_server, media_host):
    server = reliability_server

    async def slow_one(client: httpx.AsyncClient):
        started = time.monotonic()
        body = {"messages": image_messages(media_host.url("/slow?s=5")), "max_tokens": 2}
        response = await client.post(server.chat_url, json=body)
        return response, time.monotonic() - started

    async def quick_one(client: httpx.AsyncClient, body: dict, delay: float):
        await asyncio.sleep(delay)  # while the slow fetch is pending
        started = time.monotonic()
        result = await stream_chat(client, server.chat_url, body)
        return result, time.monotonic() - started

    async def scenario():
        async with async_client() as client:
            bodies = good_bodies(8)
            bodies[0] = {
                "messages": image_messages(media_host.url("/img.png")),
                "max_tokens": 2,
            }  # same host, fast
            quick = [quick_one(client, body, 0.2 + 0.1 * i) for i, body in enumerate(bodies)]
            return await asyncio.gather(slow_one(client), *quick)

    (slow, slow_seconds), *quick = run(scenario())
    assert slow.status_code == 400, slow.text
    error = slow.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0].image_url"
    assert "longer than" in error["message"]
    assert FETCH_TIMEOUT - 0.1 <= slow_seconds < FETCH_TIMEOUT + 2, slow_seconds
    for result, seconds in quick:
        result.assert_ok()
        assert seconds < FETCH_TIMEOUT, seconds  # none of them waited for the slow image
    assert_all_free(server.wait_idle())
