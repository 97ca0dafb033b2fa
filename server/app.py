"""The app factory: `create_app(settings, engine=None)`; its lifespan starts the engine and stops it last."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .engine_api import build_engine
from .errors import install_error_handlers
from .malloc_policy import release_free_memory
from .media import ImageLoader, MediaPolicy
from .media.byte_budget import MediaBytesBudget
from .media.video import VideoLoader
from .metrics import ServerMetrics
from .middleware import (
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
    TrimAfterResponseMiddleware,
    UnexpectedErrorMiddleware,
)
from .pixel_budget import PixelBudget
from .routes import router
from .settings import ServerSettings
from .startup import unless_told_to_exit
from .state import ServerState
from .stats_log import log_stats_forever

logger = logging.getLogger("ovis2.server")
DEMO_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!! serving the built-in DEMO model: tiny RANDOM weights, its answers are meaningless.\n"
    "!! For real answers: ovis2-serve --model thisisiron/Ovis2-2B-hf (or make serve MODEL=...)\n" + "!" * 78
)


# The trim waits for this much quiet after the engine's last step: at that step the event loop still holds the
# finished requests' buffers. Trimmed at once, a 256-stream burst on the demo model left 1372 MB resident;
# trimmed a second later, 1076-1082 MB, wave after wave (bench/RESULTS.md, "Server memory").
IDLE_TRIM_QUIET_SECONDS = 1.0
SHUTDOWN_MARGIN_SECONDS = 5  # how long the runner waits past the grace period for the 503s to go out
EXIT_POLL_SECONDS = 0.1


def freeze_startup_objects() -> None:
    """Move everything alive after start-up out of the garbage collector's reach. A server serving Ovis2-1B holds
    ~430k tracked objects (torch, transformers, the tokenizer, the routes); a full collection over them took 223
    ms on a 2-core Zen 5, a pause of every thread (the event loop, the engine) at unpredictable moments in the
    middle of requests. Frozen, a full collection scans only what requests create."""
    gc.collect()
    gc.freeze()


def _ask_for_trim(state: ServerState) -> None:
    if state.engine is not None:
        state.engine.request_idle_hook()


def create_app(settings: ServerSettings | None = None, engine: Any = None) -> FastAPI:
    """The server. Without `engine`, the lifespan builds the real AsyncEngine from `settings`; tests pass a fake."""
    settings = settings if settings is not None else ServerSettings()
    policy, metrics = MediaPolicy.from_settings(settings), ServerMetrics(settings.model_id)
    state = ServerState(
        settings=settings,
        metrics=metrics,
        images=ImageLoader(policy, budget=PixelBudget(settings.max_image_pixels_in_flight)),
        videos=VideoLoader.from_settings(settings, policy, on_decoded=metrics.video_decoded),
        media_bytes=MediaBytesBudget(settings.max_media_bytes_in_flight),
        engine=engine,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await unless_told_to_exit(_start_engine(state, settings), state.exit_requested)
        freeze_startup_objects()
        state.engine.set_idle_hook(release_free_memory, IDLE_TRIM_QUIET_SECONDS)
        engine = state.engine
        logger.info(
            "serving %s (%s, max_model_len %s)%s",
            state.model_id,
            engine.dtype_name,
            engine.max_model_len,
            f" on {state.listening_on}" if state.listening_on else "",
        )
        if settings.model == "demo":
            logger.warning(DEMO_BANNER)
        tasks = [asyncio.create_task(stop_after_grace(state, settings.shutdown_grace_seconds))]
        if settings.stats_log_interval > 0:
            tasks.append(asyncio.create_task(log_stats_forever(state, settings.stats_log_interval)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await _drain(state, settings.shutdown_grace_seconds)
            await state.engine.shutdown()
            state.videos.close()

    # no redirect from a path with a trailing slash: a bare 307 with no body, where a client expects the envelope
    app = FastAPI(title="ovis2-serve", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.server = state
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(UnexpectedErrorMiddleware)  # the innermost
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # the outermost: 413s and 401s free their bodies too
    app.add_middleware(TrimAfterResponseMiddleware, on_done=lambda: _ask_for_trim(state))
    return app


async def _start_engine(state: ServerState, settings: ServerSettings) -> None:
    if state.engine is None:
        state.engine = await asyncio.to_thread(build_engine, settings.engine_args_kwargs())
    await state.engine.start()
    await asyncio.to_thread(lambda: (state.engine.processor, state.engine.tokenizer))  # loaded off the loop


async def stop_after_grace(state: ServerState, grace_seconds: float) -> None:
    """Once the process is told to exit (`state.exit_requested`, set by the uvicorn runner), give in-flight
    requests the grace period, then stop the engine: what still runs, or reaches the engine later (a request still
    fetching its media), is answered with 503 engine_dead (streams: an error event and [DONE]) while the runner
    waits SHUTDOWN_MARGIN_SECONDS more before it cancels anything. When every request ends sooner, the runner
    moves on to the lifespan's shutdown, which cancels this task."""
    if state.exit_requested is None:
        return
    while not state.exit_requested():
        await asyncio.sleep(EXIT_POLL_SECONDS)
    await asyncio.sleep(grace_seconds)
    logger.warning(
        "the %.0fs grace period is over: stopping the engine (%d requests in it get a 503)",
        grace_seconds,
        state.num_in_flight,
    )
    await state.engine.shutdown()


async def _drain(state: ServerState, grace_seconds: float) -> None:
    """Let in-flight requests finish, for at most the grace period."""
    if state.num_in_flight:
        logger.info("waiting up to %.0fs for %d in-flight requests", grace_seconds, state.num_in_flight)
    deadline = time.monotonic() + grace_seconds
    while state.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.num_in_flight:
        logger.warning("%d requests still running after the grace period; stopping", state.num_in_flight)
