"""Pure ASGI middleware: the API key check and the request body cap, both before any body is parsed, and the heap
trim asked for once a response has gone out."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

logger = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
BODY_METHODS = ("POST", "PUT", "PATCH")
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # past this much of an oversized body, the connection is just closed


class APIKeyMiddleware:
    """Inference routes need `Authorization: Bearer <key>` (scheme case-insensitive, RFC 7235); the key's sha256
    is compared in constant time, so neither its content nor its length leaks through timing."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = hashlib.sha256(api_key.encode()).digest()

    def _is_authorized(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(digest, self.expected) and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not self._is_authorized(dict(scope["headers"]).get(b"authorization", b"")):
            response = error_response(
                "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                401,
                code="invalid_api_key",
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) or path.rstrip("/") == "/v1"


class BodySizeLimitMiddleware:
    """Bodies over `max_bytes` get a 413, whether Content-Length says so or the streamed body shows it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Read and drop what the client is still sending (up to a bound) before answering: closing a socket
            # with unread data makes the kernel reset the connection, and the client then often never sees the
            # 413. A client that waits for "100 Continue" has sent nothing yet and gets the 413 straight away.
            if b"100-continue" not in dict(scope["headers"]).get(b"expect", b"").lower():
                await _discard_body(receive, DRAIN_LIMIT_BYTES)
            await self._too_large(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _discard_body(receive, DRAIN_LIMIT_BYTES)  # as above
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            f"the request body is larger than {self.max_bytes} bytes", 413, code="request_too_large"
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


async def _discard_body(receive: Receive, limit: int) -> None:
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        size += len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class UnexpectedErrorMiddleware:
    """A bug's exception becomes the 500 envelope here. Starlette's outermost handler answers the same, then
    re-raises, and the server closes the connection: a client's next request on it was reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:  # a response under way cannot turn into a 500
                raise
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await error_response("internal server error", 500)(scope, receive, send)


class TrimAfterResponseMiddleware:
    """Once a POST's response has gone out (a stream's last byte read, or the client gone), `on_done()`: the server
    asks the engine for a heap trim after its quiet second. The engine trims on its own only after its last step,
    before the HTTP side has freed what a slow reader's stream or a request failing on its media held."""

    def __init__(self, app: ASGIApp, on_done: Callable[[], None]) -> None:
        self.app = app
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            try:
                self.on_done()
            except Exception:  # noqa: BLE001 - a trim not asked for is no reason to fail a response
                logger.exception("asking for a heap trim failed")
