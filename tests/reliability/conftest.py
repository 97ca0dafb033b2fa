"""Fixtures for the reliability tests (issue 7): real server subprocesses on the tiny demo checkpoint, configured
for load, faults and hostile input, and local HTTP servers that play image hosts. Loopback only.

- `reliability_server` (session): `tests.reliability.fault_server` (the real CLI plus a test-only fault hook),
  short media timeouts, at most 2 images per request, a 2 MiB body cap, a 4 Mpixel cap, and only 127.0.0.2
  allowed as a private media address, so 127.0.0.1 and every other private address stay refused.
- `media_host` (session): an image server on 127.0.0.2 (allowed); `loopback_host`: one on 127.0.0.1 (refused),
  which records every request it gets, so a test can show the server never connected to it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.live_server import LiveServer
from tests.server.conftest import ImageServer, data_url, image_bytes

MEDIA_HOST = "127.0.0.2"
BODY_LIMIT = 2 * 1024 * 1024
MAX_IMAGES = 2
MAX_PIXELS = 4_000_000
FETCH_TIMEOUT = 1.5


def assert_all_free(m: dict[str, float]) -> None:
    assert m["ovis2_num_requests_running"] == 0 and m["ovis2_num_requests_waiting"] == 0, m
    assert m["ovis2_kv_cache_free_blocks"] == m["ovis2_kv_cache_total_blocks"] > 0, m
    assert m["ovis2_kv_cache_usage_ratio"] == 0, m


@pytest.fixture(scope="session")
def reliability_server() -> Iterator[LiveServer]:
    server = LiveServer(
        [
            "--allowed-media-networks",
            MEDIA_HOST,
            "--media-connect-timeout",
            "1",
            "--media-fetch-timeout",
            str(FETCH_TIMEOUT),
            "--max-images-per-request",
            str(MAX_IMAGES),
            "--max-request-body-bytes",
            str(BODY_LIMIT),
            "--max-image-pixels",
            str(MAX_PIXELS),
            "--shutdown-grace-seconds",
            "5",
        ],
        module="tests.reliability.fault_server",
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------- image hosts


@pytest.fixture(scope="session")
def media_host() -> Iterator[ImageServer]:
    host = ImageServer(MEDIA_HOST)
    yield host
    host.close()


@pytest.fixture(scope="session")
def loopback_host() -> Iterator[ImageServer]:
    """Refused by the reliability server; records every request, so a test can show none arrived."""
    host = ImageServer("127.0.0.1")
    yield host
    host.close()


# ------------------------------------------------------------------------------------------------ the clients


def text_messages(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def image_messages(url: str, text: str = "What is this?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def small_image_url(i: int) -> str:
    """One of 8 small distinct PNGs (one tile each)."""
    return data_url(image_bytes(size=(24 + i % 8, 20), color=((37 * i) % 256, 90, 200)))


@dataclass
class StreamResult:
    status: int
    events: list = field(default_factory=list)  # parsed JSON payloads
    done: bool = False
    body: bytes = b""

    @property
    def finish_reasons(self) -> list[str]:
        return [
            c["finish_reason"] for e in self.events for c in e.get("choices", ()) if c.get("finish_reason")
        ]

    @property
    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if "error" in e]

    @property
    def text(self) -> str:
        return "".join(c["delta"].get("content") or "" for e in self.events for c in e.get("choices", ()))

    def assert_ok(self) -> None:
        assert self.status == 200, (self.status, self.body[:500])
        assert not self.errors, self.errors
        assert self.done and len(self.finish_reasons) == 1 and self.finish_reasons[0] in ("stop", "length"), (
            self.events
        )


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> StreamResult:
    """One streamed chat completion, read to the end."""
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        result = StreamResult(response.status_code)
        if response.status_code != 200:
            result.body = await response.aread()
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result.done = True
            else:
                result.events.append(json.loads(line[len("data: ") :]))
    return result


def async_client(keepalive: bool = True) -> httpx.AsyncClient:
    """Room for every concurrent request; without keep-alive each request has its own connection."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000 if keepalive else 0)
    return httpx.AsyncClient(timeout=120, limits=limits)


def run(coro):
    return asyncio.run(coro)
