"""What every answer route (chat, completions, responses) reads from the engine's outputs: the usage, the final
output checked for failure, and a stream's updates choice by choice, a failure ending it as EngineStreamFailed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from .engine_api import CompletionOutput, EngineDeadError, RequestOutput
from .errors import ENGINE_DEAD, APIError
from .protocol import PromptTokensDetails, Usage
from .request_flow import ENGINE_FAILED, RequestRefused, engine_failure, failed

logger = logging.getLogger("ovis2.server")


def usage_of(output: RequestOutput) -> Usage:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(o.token_ids) for o in output.outputs)
    details = PromptTokensDetails(
        cached_tokens=output.num_cached_tokens, image_tokens=output.num_image_tokens
    )
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


def check_engine_error(output: RequestOutput | None, request_id: str) -> RequestOutput:
    if output is None:
        logger.error("request %s ended without output", request_id)
        raise APIError(ENGINE_FAILED, 500)
    if failed(output):
        raise engine_failure(output)
    return output


class EngineStreamFailed(Exception):
    """The engine failed this request in the middle of its stream; `error` is what the client is told."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


async def choice_updates(
    first: RequestOutput, rest: AsyncIterator[RequestOutput], refused_param: str | None = None
) -> AsyncIterator[tuple[RequestOutput, CompletionOutput]]:
    """(output, choice) for each update of a choice, up to and including the one that finishes it; a failure ends
    it with EngineStreamFailed (one of the request's own making names `refused_param`, its constraint's field)."""
    finished: set[int] = set()
    async with aclosing(rest):
        try:
            async for output in prepend(first, rest):
                if failed(output):
                    error = engine_failure(output)
                    if isinstance(error, RequestRefused):
                        error.param = error.param or refused_param
                    raise EngineStreamFailed(error)
                for choice in output.outputs:
                    if choice.index not in finished:
                        finished.update([choice.index] if choice.finished else [])
                        yield output, choice
        except EngineDeadError as exc:  # the loop died (or was stopped) with the stream open
            logger.error("the engine stopped during a stream: %s", exc)
            raise EngineStreamFailed(APIError(ENGINE_DEAD, 503, code="engine_dead")) from exc
        except EngineStreamFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a stream that has begun can only end with an error event
            logger.exception("the stream of an answer failed")
            raise EngineStreamFailed(APIError(ENGINE_FAILED, 500)) from exc


async def prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for output in rest:
        yield output
