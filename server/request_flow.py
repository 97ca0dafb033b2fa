"""One request's flow through the engine: its outputs with metrics recorded, a wait that gives up when the client
disconnects, and the response (whole or streamed) built from the outputs.

Aborts have one owner, `engine.generate()`: closing or cancelling its iterator aborts the request. `generate` here
closes the engine's iterator as soon as it is closed itself, so a consumer that stops early aborts at once."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response

from .engine_api import EngineInputs, RequestOutput, SamplingParams
from .errors import APIError
from .state import ServerState
from .streaming import sse_response

T = TypeVar("T")
logger = logging.getLogger("ovis2.server")
DISCONNECT_POLL_SECONDS = 0.5
ENGINE_FAILED = "the engine failed while generating this answer"
ANSWER_THREADS = 2  # whole answers built at once, apart from the default pool's media work


class RequestRefused(APIError):
    """The engine failed a request on the request's own input (a structured-output constraint at a dead end)."""


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


async def generate(
    state: ServerState,
    inputs: EngineInputs,
    params: SamplingParams,
    request_id: str,
    arrival: float,
    answers_tokens: bool = True,
) -> AsyncIterator[RequestOutput]:
    """`engine.generate` with metrics; leaving early (close, cancel, error) closes the engine's iterator, which
    aborts the request. `answers_tokens` False: the tokens run are not the answer's (completions' echo with
    max_tokens 0), so no token counts or latencies are recorded for them.

    Consume it inside `contextlib.aclosing` so the abort happens at once, not when it is garbage-collected.
    """
    timing = TokenTiming(arrival)
    final: RequestOutput | None = None
    refused = False
    state.request_started()
    try:
        async with aclosing(state.engine.generate(inputs, params, request_id)) as outputs:
            async for output in outputs:
                if answers_tokens:
                    timing.observe(state, output)
                final = output
                yield output
    except Exception:
        refused = True  # overloaded, its input refused, or a bug: answered with an error, not counted
        raise
    finally:
        try:
            if final is not None:
                _record_finished(state, inputs, final, arrival, timing.num_generated)
            elif not refused:  # the client left while it waited (queued, its grammar compiling): an abort
                _record_unanswered(state, params, arrival)
        finally:
            state.request_finished()


@dataclass
class TokenTiming:
    """Time to first token and inter-token latency of one request, observed as its outputs arrive."""

    arrival: float
    first: float | None = None
    last: float | None = None
    num_generated: int = (
        0  # from the deltas: with output_kind "delta" an unfinished output holds no token_ids
    )

    def observe(self, state: ServerState, output: RequestOutput) -> None:
        now, metrics = time.monotonic(), state.metrics
        self.num_generated += sum(len(o.delta_token_ids) for o in output.outputs)
        step_tokens = max((len(o.delta_token_ids) for o in output.outputs), default=0)
        if not step_tokens:
            return
        if self.first is None:
            self.first = now
            metrics.observe(metrics.time_to_first_token, now - self.arrival)
            _observe_queue_time(state, output)
        else:
            metrics.observe(metrics.inter_token_latency, (now - self.last) / step_tokens)
        self.last = now


def _observe_queue_time(state: ServerState, output: RequestOutput) -> None:
    queue_time = getattr(getattr(output, "metrics", None), "queue_time", None)
    if queue_time is not None:
        state.metrics.observe(state.metrics.queue_time, queue_time)


def _record_finished(
    state: ServerState, inputs: EngineInputs, final: RequestOutput, arrival: float, num_generated: int
) -> None:
    m = state.metrics
    m.observe(m.e2e_latency, time.monotonic() - arrival)
    m.count(m.prompt_tokens, len(final.prompt_token_ids))
    m.count(m.image_tokens, inputs.num_image_tokens)
    m.count(m.images, len(inputs.images) - inputs.num_video_frames)
    m.count(m.generation_tokens, num_generated)
    for output in final.outputs:
        m.count(m.requests, 1, finished_reason=output.finish_reason or "abort")


def _record_unanswered(state: ServerState, params: SamplingParams, arrival: float) -> None:
    m = state.metrics
    m.observe(m.e2e_latency, time.monotonic() - arrival)
    m.count(m.requests, params.n, finished_reason="abort")


async def collect_final(outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    final = None
    async with aclosing(outputs):
        async for output in outputs:
            final = output
    return final


async def respond(
    outputs: AsyncIterator[RequestOutput],
    raw: Request,
    stream: bool,
    stream_body: Callable[[RequestOutput], AsyncIterator[str]],
    whole: Callable[[RequestOutput | None], Any],
) -> Any:
    """Stream SSE built from the first output on, or answer once with the final output; 499 if the client left.

    The first output is awaited before the headers go out, so a full queue is still a 503 when streaming."""
    if not stream:
        try:
            final = await unless_disconnected(collect_final(outputs), raw)
        except ClientDisconnected:
            return Response(status_code=499)
        return await whole_answer(whole, final)
    try:
        first = await unless_disconnected(anext(outputs), raw)
    except ClientDisconnected:
        return Response(status_code=499)
    except StopAsyncIteration:
        raise APIError(ENGINE_FAILED, 500) from None
    if failed(first):  # nothing sent yet: a plain error rather than a 200 stream holding only an error
        await outputs.aclose()
        raise engine_failure(first)
    return sse_response(stream_body(first))


async def whole_answer(whole: Callable[[RequestOutput | None], Any], final: RequestOutput | None) -> Response:
    """The answer built and serialized in a thread of its own pool: a large one (the prompt logprobs of several
    prompts and choices: tens of MB) held the event loop, and every other request with it, for seconds; in the
    default pool, answers would wait behind image decodes."""
    body = await in_answer_thread(_serialized, whole, final)
    return Response(body, media_type="application/json")


async def in_answer_thread(function: Callable[..., T], *args) -> T:
    """function(*args) in the pool that builds answers (large ones would hold the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(
        _answer_threads(), functools.partial(function, *args)
    )


def _serialized(whole: Callable[[RequestOutput | None], Any], final: RequestOutput | None) -> str:
    return whole(final).model_dump_json(by_alias=True)


@functools.cache
def _answer_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=ANSWER_THREADS, thread_name_prefix="ovis2-answer")


def failed(output: RequestOutput) -> bool:
    return output.error is not None or any(o.finish_reason == "error" for o in output.outputs)


def engine_failure(output: RequestOutput) -> APIError:
    """What a request the engine failed is answered with: a 400 with the engine's reason when the request's own
    input caused it (a structured-output constraint at a dead end), else a 500 that tells nothing of the inside."""
    if output.user_error:
        logger.info("request %s failed on its own input: %s", output.request_id, output.error)
        return RequestRefused(output.error or "this request cannot be answered", 400)
    logger.error("request %s failed in the engine: %s", output.request_id, output.error)
    return APIError(ENGINE_FAILED, 500)


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
