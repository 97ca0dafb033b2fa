"""One chat completion request against any OpenAI-compatible server, timed token by token."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from .workload import BenchRequest


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # perf_counter when the request was sent
    ttft: float = 0.0  # seconds to the first content token
    latency: float = 0.0  # seconds, end to end
    itl: list[float] = field(default_factory=list)  # seconds between successive content chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the server's prefix cache held (its usage says)
    num_images: int = 0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a single-token answer."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Endpoint:
    url: str  # full URL of the chat completions route
    model: str
    api_key: str | None = None
    stream: bool = True
    extra_body: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(endpoint: Endpoint, request: BenchRequest) -> dict:
    payload = {"model": endpoint.model, "messages": request.messages, "max_tokens": request.max_tokens}
    payload["stream"] = endpoint.stream
    if endpoint.stream:
        payload["stream_options"] = {"include_usage": True}
    return payload | endpoint.extra_body | request.extra_body


async def iter_sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The payload of each `data:` line of a Server-Sent Events body, up to (not including) [DONE]."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield data


def chunk_content(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or choices[0].get("message") or {}
    return delta.get("content") or ""


def record_usage(result: RequestResult, usage: dict | None) -> None:
    if usage:
        result.output_tokens = usage.get("completion_tokens", result.output_tokens)
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_prompt_tokens = details.get("cached_tokens") or 0


async def read_stream(response: httpx.Response, result: RequestResult) -> None:
    last = result.start_time
    usage = None
    async for data in iter_sse_data(response):
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"error event: {chunk['error']}")
        usage = chunk.get("usage") or usage
        if not chunk_content(chunk):
            continue
        now = time.perf_counter()
        if result.output_tokens == 0:
            result.ttft = now - result.start_time
        else:
            result.itl.append(now - last)
        last = now
        result.output_tokens += 1  # one chunk per token unless usage says otherwise
    result.latency = time.perf_counter() - result.start_time
    record_usage(result, usage)


async def read_whole(response: httpx.Response, result: RequestResult) -> None:
    body = json.loads(await response.aread())
    result.latency = result.ttft = time.perf_counter() - result.start_time
    record_usage(result, body.get("usage"))


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, request: BenchRequest) -> RequestResult:
    """Never raises for a server problem: failures come back as `success=False` with the reason."""
    result = RequestResult(num_images=request.num_images, start_time=time.perf_counter())
    payload = build_payload(endpoint, request)
    try:
        async with client.stream("POST", endpoint.url, json=payload, headers=endpoint.headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {response.status_code}: {body[:200]}")
            reader = read_stream if endpoint.stream else read_whole
            await reader(response, result)
        result.success = result.output_tokens > 0
        result.error = "" if result.success else "no output tokens"
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result
