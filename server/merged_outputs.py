"""Several engine requests answered as one: the outputs of a /v1/completions request with several prompts.

Prompt k's choice i becomes choice k x n + i (prompt-major, as vLLM numbers them). Each merged output holds every
choice: the ones that moved carry their deltas, the others none, and the finished ones their whole text and ids
(what a finished engine output carries), so the last merged output is the whole answer and its usage counts every
prompt and every choice. Leaving early, or one request failing (raising, or an output saying it failed: the merge
ends with that output), closes every request's stream, which aborts them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing

from .engine_api import CompletionOutput, RequestOutput
from .request_flow import failed

_END = object()


async def merged_outputs(
    streams: list[AsyncIterator[RequestOutput]], prompts: list[list[int]], n: int, request_id: str
) -> AsyncIterator[RequestOutput]:
    # bounded: for a slow reader the engine's own streams merge the outputs waiting, instead of this queue growing
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    pumps = [asyncio.create_task(_pump(k, stream, queue)) for k, stream in enumerate(streams)]
    latest = [[CompletionOutput(index=k * n + i) for i in range(n)] for k in range(len(streams))]
    cached = [0] * len(streams)
    combined_prompt = [token for prompt in prompts for token in prompt]
    try:
        for _ in range(len(streams)):
            while (item := await queue.get())[1] is not _END:
                k, output = item
                if isinstance(output, BaseException):
                    raise output
                moved = [dataclasses.replace(o, index=k * n + o.index) for o in output.outputs]
                cached[k] = output.num_cached_tokens
                yield _merged(request_id, combined_prompt, latest, k, moved, output, sum(cached))
                if failed(output):  # the answer has failed: the others are aborted, not waited for
                    return
                latest[k] = [_quiet(o) for o in moved]
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(k: int, stream: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    try:
        async with aclosing(stream):
            async for output in stream:
                await queue.put((k, output))
    except asyncio.CancelledError:
        raise
    except BaseException as error:  # noqa: BLE001 - the consumer raises it
        await queue.put((k, error))
        return
    await queue.put((k, _END))


def _merged(
    request_id: str,
    prompt: list[int],
    latest: list[list[CompletionOutput]],
    k: int,
    moved: list[CompletionOutput],
    output: RequestOutput,
    num_cached: int,
) -> RequestOutput:
    outputs = [o for j, choices in enumerate(latest) for o in (moved if j == k else choices)]
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=prompt,
        outputs=outputs,
        num_cached_tokens=num_cached,
        error=output.error,
        user_error=output.user_error,
    )


def _quiet(output: CompletionOutput) -> CompletionOutput:
    """The choice as it stands, with nothing new in it."""
    empty_logprobs = None if output.delta_logprobs is None else []
    return dataclasses.replace(output, delta_text="", delta_token_ids=[], delta_logprobs=empty_logprobs)
