"""Start-up as a user sees it: the address taken before the model loads, a load the project refuses reported in one
line (not uvicorn's traceback), and a stop signal during the load obeyed at once."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .engine_api import Ovis2Error

EXIT_POLL_SECONDS = 0.1


class StartupStopped(Exception):
    """The process was told to exit while the model loaded."""


def bound_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` names, as uvicorn's own bind (asyncio's create_server) makes them: the
    IPv6 ones IPv6-only, "" for every interface. Not yet listening, so connections are refused until the server
    serves; an address that cannot be had raises Ovis2Error at once, before minutes of loading."""
    try:
        found = socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as error:
        raise Ovis2Error(f"cannot listen on {host}:{port}: {error}") from None
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise Ovis2Error(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sockets


def urls_of(sockets: list[socket.socket]) -> str:
    """Where the sockets listen, for the log (the port chosen where --port is 0)."""
    urls = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        urls.append(f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}")
    return ", ".join(urls)


async def unless_told_to_exit(work: Awaitable, exit_requested: Callable[[], bool] | None):
    """`work`'s result, or StartupStopped as soon as `exit_requested()` is true (the work is left running: the
    process is about to end)."""
    task = asyncio.ensure_future(work)
    if exit_requested is None:
        return await task
    while not task.done():
        if exit_requested():
            raise StartupStopped
        await asyncio.wait({task}, timeout=EXIT_POLL_SECONDS)
    return task.result()


class StartupOutcome:
    """ASGI wrapper around the app: a lifespan start-up failing with Ovis2Error (a checkpoint, tokenizer or setting
    the load refuses) or StartupStopped is kept here (`error`, `stopped`) for the runner to report, and uvicorn
    is told only that start-up failed; any other failure keeps its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: str | None = None
        self.stopped = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held = []

        async def holding_failure(message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent below, once the exception says which failure it is
            else:
                await send(message)

        try:
            await self.app(scope, receive, holding_failure)
        except (Ovis2Error, StartupStopped) as failure:
            if not held:  # not at start-up
                raise
            if isinstance(failure, StartupStopped):
                self.stopped = True
            else:
                self.error = str(failure)
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        except BaseException:
            for message in held:
                await send(message)
            raise
