"""schemathesis against the real server's own OpenAPI schema for POST /v1/chat/completions: valid and invalid
bodies alike never get a 5xx, and every error carries the OpenAI envelope.

Bounded: a fixed number of examples per mode, answers capped at a few tokens, and every generated http(s) image
URL pointed at the test's own image host, so nothing leaves loopback."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

EXAMPLES = 100
MAX_TOKENS = 3


def bounded(body, image_url: str):
    """The same body with answers capped at MAX_TOKENS and http(s) image URLs on the local image host."""
    if isinstance(body, list):
        return [bounded(item, image_url) for item in body]
    if not isinstance(body, dict):
        return body
    body = {key: bounded(value, image_url) for key, value in body.items()}
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if isinstance(body.get("url"), str) and body["url"][:5].lower() in ("http:", "https"):
        body["url"] = image_url
    return body


REFUSED_BY_DESIGN = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "response_format",
    "model",
)


def deeper(body: dict) -> None:
    """Take a valid body past the checks that refuse it by design (tool roles, a random model name, ...), so more
    examples reach the processor and the engine."""
    for key in REFUSED_BY_DESIGN:
        body.pop(key, None)
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    if body.get("stream_options") is not None:
        body["stream"] = True
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            if message.get("role") in ("tool", "function"):
                message["role"] = "user"
            for key in ("tool_calls", "function_call", "audio", "tool_call_id"):
                message.pop(key, None)
            if message.get("content") is None:
                message["content"] = "hi"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_the_chat_route_never_answers_5xx(reliability_server, media_host, mode):
    server = reliability_server
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operation = schema["/v1/chat/completions"]["POST"]
    image_url = media_host.url("/img.png")
    seen: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        if isinstance(case.body, dict | list):
            case.body = bounded(case.body, image_url)
        if isinstance(case.body, dict):
            if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
                case.body["max_tokens"] = MAX_TOKENS  # else the answer may fill the whole context
            if mode == GenerationMode.POSITIVE:
                deeper(case.body)
        response = case.call(base_url=server.base_url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error

    fuzz()
    assert sum(seen.values()) >= EXAMPLES // 2, seen
    assert httpx.get(server.base_url + "/health").status_code == 200
