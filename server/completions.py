"""/v1/completions for plain text prompts (a string or token ids, or a list of several)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Request, Response

from .answers import EngineStreamFailed, check_engine_error, choice_updates
from .completion_builder import CompletionBuilder, Echo
from .engine_api import IMAGE_TOKEN_IDS, EngineInputs, RequestOutput
from .errors import APIError, bad_request
from .merged_outputs import merged_outputs
from .prompt_logprobs import check_prompt_logprob_values
from .protocol import CompletionRequest, random_id
from .request_flow import generate, in_answer_thread, respond
from .sampling import build_sampling_params, check_token_ids, resolve_max_tokens
from .state import ServerState
from .streaming import DONE, sse_api_error
from .structured_outputs import constrained, constraint_param, requested_constraint

MAX_PROMPTS = 16
T = TypeVar("T")


async def create_completion(state: ServerState, request: CompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    state.check_model(request.model)
    check_unsupported(request)
    constraint = requested_constraint(request)
    prompts = split_prompts(request.prompt, state.settings.max_waiting_requests)
    prompt_ids = [
        await asyncio.to_thread(for_prompt, k, len(prompts), prompt_token_ids, state, p)
        for k, p in enumerate(prompts)
    ]  # long ones take seconds
    request_id = random_id("cmpl")
    n = request.n or 1
    check_prompt_logprob_count(request, prompt_ids, n)
    echo = await echo_of(state, request, prompts, prompt_ids)
    builder = CompletionBuilder(
        request_id, state.model_id, echo, n, request.logprobs is not None, request.prompt_logprobs is not None
    )
    streams = [
        generate(
            state,
            EngineInputs(prompt_token_ids=ids, cache_salt=request.cache_salt),
            for_prompt(k, len(prompts), sampling_params, state, request, ids, constraint),
            request_id if len(prompts) == 1 else f"{request_id}-{k}",
            arrival,
            answers_tokens=not prompt_only(request),
        )
        for k, ids in enumerate(prompt_ids)
    ]
    if prompt_logprobs_k(request) is not None:  # they come in the engine's outputs: kept per prompt
        streams = [builder.recording(k, stream) for k, stream in enumerate(streams)]
    outputs = streams[0] if len(streams) == 1 else merged_outputs(streams, prompt_ids, n, request_id)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return await constrained(
        state,
        constraint,
        respond(
            outputs,
            raw,
            bool(request.stream),
            stream_body=lambda first: stream_completion(
                outputs, first, builder, include_usage, constraint_param(constraint)
            ),
            whole=lambda final: builder.response(check_engine_error(final, request_id)),
        ),
    )


def sampling_params(state: ServerState, request: CompletionRequest, prompt_ids: list[int], constraint):
    # the prompt alone: one token runs (free of any constraint) and is left out
    echo_only = prompt_only(request)
    max_tokens = resolve_max_tokens(
        1 if echo_only else request.max_tokens, len(prompt_ids), 0, state.max_model_len, "prompt"
    )
    return build_sampling_params(
        request,
        max_tokens=max_tokens,
        logprobs=request.logprobs,
        prompt_logprobs=prompt_logprobs_k(request),
        vocab_size=state.vocab_size,
        structured_outputs=constraint.params if constraint is not None and not echo_only else None,
    )


def check_unsupported(request: CompletionRequest) -> None:
    if request.suffix:
        raise bad_request("suffix (insertion) is not supported", "suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise bad_request("best_of other than n is not supported", "best_of")


def prompt_only(request: CompletionRequest) -> bool:
    """`echo` with `max_tokens: 0`: the answer is the prompt alone."""
    return bool(request.echo) and request.max_tokens == 0


def prompt_logprobs_k(request: CompletionRequest) -> int | None:
    """The top k of the prompt logprobs the answer carries (vLLM's rule): `prompt_logprobs`, else with `echo` the
    request's `logprobs`; None for none."""
    if request.prompt_logprobs is not None:
        return request.prompt_logprobs
    return request.logprobs if request.echo else None


def check_prompt_logprob_count(request: CompletionRequest, prompt_ids: list[list[int]], n: int) -> None:
    k = prompt_logprobs_k(request)
    if k is None:
        return
    places = (request.prompt_logprobs is not None) + (request.echo and request.logprobs is not None)
    values = sum(len(ids) for ids in prompt_ids) * n * (k + 1) * places
    check_prompt_logprob_values(
        values, "prompt_logprobs" if request.prompt_logprobs is not None else "logprobs"
    )


def split_prompts(prompt: str | list, max_waiting: int) -> list[str | list[int]]:
    """The request's prompts: a string, token ids, or a list of several of either (at most MAX_PROMPTS, and no
    more than the engine queues: each prompt waits as a request of its own)."""
    if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], str | list):
        return [prompt]
    limit = min(MAX_PROMPTS, max_waiting)
    if len(prompt) > limit:
        raise bad_request(f"the request has {len(prompt)} prompts; at most {limit} are allowed", "prompt")
    return list(prompt)


def for_prompt(k: int, num_prompts: int, work: Callable[..., T], *args) -> T:
    """work(*args) for prompt k of num_prompts; a 400 it raises names prompt[k] when there are several."""
    try:
        return work(*args)
    except APIError as error:
        if num_prompts > 1 and error.param == "prompt":
            error.param = f"prompt[{k}]"
            error.message = f"prompt[{k}]: {error.message}"
        raise


async def echo_of(
    state: ServerState,
    request: CompletionRequest,
    prompts: list[str | list[int]],
    prompt_ids: list[list[int]],
) -> Echo:
    if not request.echo:
        return Echo([""] * len(prompts))
    texts = [await echoed_prompt(state, p, ids) for p, ids in zip(prompts, prompt_ids, strict=True)]
    first_tokens = None
    if request.logprobs is not None:  # the engine gives no logprob, so no text, for a prompt's first token
        decode = state.engine.tokenizer.decode
        first_tokens = [decode(ids[:1], skip_special_tokens=False) for ids in prompt_ids]
    return Echo(texts, first_tokens, only=prompt_only(request))


async def echoed_prompt(state: ServerState, prompt: str | list[int], prompt_ids: list[int]) -> str:
    """A text prompt as sent (decoding its ids would normalize it: the tokenizer applies NFC), or the text of
    token ids."""
    if isinstance(prompt, str):
        return prompt
    return await asyncio.to_thread(state.engine.tokenizer.decode, prompt_ids)


def prompt_token_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    """One prompt: text (control tokens in it act as control tokens) or token ids; never image tokens."""
    if isinstance(prompt, str):
        ids = state.engine.tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = list(prompt)
        check_token_ids(ids, state.vocab_size, "prompt")
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    if IMAGE_TOKEN_IDS.intersection(ids):
        raise bad_request(
            "image tokens are not allowed in a text prompt; send images to /v1/chat/completions", "prompt"
        )
    return ids


async def stream_completion(
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    builder: CompletionBuilder,
    include_usage: bool,
    refused_param: str | None = None,
) -> AsyncIterator[str]:
    last = first
    started: set[int] = set()
    try:
        async for output, choice in choice_updates(first, outputs, refused_param):
            last = output
            first_chunk = choice.index not in started
            if builder.starts_with_prompt_logprobs(first_chunk):  # large: built off the event loop
                chunk = await in_answer_thread(builder.delta_chunk, choice, first_chunk, include_usage)
            else:
                chunk = builder.delta_chunk(choice, first_chunk, include_usage)
            if chunk is not None:
                started.add(choice.index)
                yield chunk
    except EngineStreamFailed as failure:
        yield sse_api_error(failure.error)
        yield DONE
        return
    if include_usage:
        yield builder.chunk([], builder.usage(last), include_usage)
    yield DONE
