"""TrimAfterResponseMiddleware: the heap trim is asked for once a POST's response has gone out, whatever happened."""

import asyncio

import pytest

from server.middleware import TrimAfterResponseMiddleware


def scope(method: str = "POST") -> dict:
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": []}


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def streaming_app(chunks: int):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_the_trim_is_asked_for_after_the_last_byte_of_a_stream():
    calls, seen_at_each_send = [], []

    async def send(message):
        seen_at_each_send.append(len(calls))

    middleware = TrimAfterResponseMiddleware(streaming_app(3), on_done=lambda: calls.append(1))
    asyncio.run(middleware(scope(), receive, send))
    assert seen_at_each_send == [0] * 5 and calls == [1]


def test_the_trim_is_asked_for_when_the_app_or_the_client_fails_and_the_error_still_surfaces():
    calls = []

    async def gone(message):
        raise OSError("the client went away")

    async def failing_app(scope, receive, send):
        raise RuntimeError("the handler failed")

    for app, send, error in ((streaming_app(1), gone, OSError), (failing_app, gone, RuntimeError)):
        with pytest.raises(error):
            asyncio.run(
                TrimAfterResponseMiddleware(app, on_done=lambda: calls.append(1))(scope(), receive, send)
            )
    assert calls == [1, 1]


def test_only_posts_ask_and_a_failing_ask_breaks_no_response():
    sent = []

    async def send(message):
        sent.append(message["type"])

    def broken():
        raise AttributeError("this engine cannot trim")

    asyncio.run(TrimAfterResponseMiddleware(streaming_app(0), on_done=broken)(scope(), receive, send))
    calls = []
    asyncio.run(
        TrimAfterResponseMiddleware(streaming_app(0), lambda: calls.append(1))(scope("GET"), receive, send)
    )
    assert calls == [] and sent.count("http.response.start") == 2
