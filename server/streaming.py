"""Server-Sent Events: `data: <json>\\n\\n` per chunk, an error event if the engine fails, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .errors import error_body

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_event(event: str, payload: dict) -> str:
    """A named event (`event: <name>` then its data), as the Responses API streams them."""
    return f"event: {event}\n" + sse(payload)


def chunk_payload(chunk: BaseModel, include_usage: bool) -> dict:
    """A chunk as OpenAI sends it: `usage` only when asked for, deltas without null fields."""
    payload = chunk.model_dump(mode="json")
    if not include_usage:
        payload.pop("usage", None)
    for choice in payload.get("choices", ()):
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return payload


def sse_api_error(error) -> str:
    """An APIError as a stream's error event, in the same envelope as a whole answer's."""
    return sse(error_body(error.message, error.status, error.param, error.code))


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
