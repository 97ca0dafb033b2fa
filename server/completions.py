"""/v1/completions for plain text prompts (a string or token ids, or a list of several)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Request, Response

from .chat import EngineStreamFailed, check_engine_error, choice_updates, usage_of
from .engine_api import IMAGE_TOKEN_IDS, CompletionOutput, EngineInputs, RequestOutput, TokenLogprob
from .errors import APIError, bad_request
from .merged_outputs import merged_outputs
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    now,
    random_id,
)
from .request_flow import generate, respond
from .sampling import build_sampling_params, check_token_ids, resolve_max_tokens
from .state import ServerState
from .streaming import DONE, chunk_payload, sse, sse_api_error
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
        await asyncio.to_thread(for_prompt, k, prompts, prompt_token_ids, state, p)
        for k, p in enumerate(prompts)
    ]  # long ones take seconds
    if request.echo:
        echoed = [await echoed_prompt(state, p, ids) for p, ids in zip(prompts, prompt_ids, strict=True)]
    else:
        echoed = [""] * len(prompts)
    request_id = random_id("cmpl")
    streams = [
        generate(
            state,
            EngineInputs(prompt_token_ids=ids, cache_salt=request.cache_salt),
            for_prompt(k, prompts, sampling_params, state, request, ids, constraint),
            request_id if len(prompts) == 1 else f"{request_id}-{k}",
            arrival,
        )
        for k, ids in enumerate(prompt_ids)
    ]
    n = request.n or 1
    outputs = streams[0] if len(streams) == 1 else merged_outputs(streams, prompt_ids, n, request_id)
    builder = CompletionBuilder(request_id, state.model_id, echoed, n, request.logprobs is not None)
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
            whole=lambda final: completion_response(
                check_engine_error(final, request_id), builder, state.model_id
            ),
        ),
    )


def sampling_params(state: ServerState, request: CompletionRequest, prompt_ids: list[int], constraint):
    max_tokens = resolve_max_tokens(request.max_tokens, len(prompt_ids), 0, state.max_model_len, "prompt")
    return build_sampling_params(
        request,
        max_tokens=max_tokens,
        logprobs=request.logprobs,
        vocab_size=state.vocab_size,
        structured_outputs=constraint.params if constraint is not None else None,
    )


def completion_response(
    final: RequestOutput, builder: CompletionBuilder, model_id: str
) -> CompletionResponse:
    choices = [builder.full(o) for o in sorted(final.outputs, key=lambda o: o.index)]
    return CompletionResponse(
        id=builder.request_id, created=builder.created, model=model_id, choices=choices, usage=usage_of(final)
    )


def check_unsupported(request: CompletionRequest) -> None:
    if request.suffix:
        raise bad_request("suffix (insertion) is not supported", "suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise bad_request("best_of other than n is not supported", "best_of")
    if request.echo and request.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo")


def split_prompts(prompt: str | list, max_waiting: int) -> list[str | list[int]]:
    """The request's prompts: a string, token ids, or a list of several of either (at most MAX_PROMPTS, and no
    more than the engine queues: each prompt waits as a request of its own)."""
    if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], str | list):
        return [prompt]
    limit = min(MAX_PROMPTS, max_waiting)
    if len(prompt) > limit:
        raise bad_request(f"the request has {len(prompt)} prompts; at most {limit} are allowed", "prompt")
    return list(prompt)


def for_prompt(k: int, prompts: list, work: Callable[..., T], *args) -> T:
    """work(*args) for prompt k; a 400 it raises names prompt[k] when there are several."""
    try:
        return work(*args)
    except APIError as error:
        if len(prompts) > 1 and error.param == "prompt":
            error.param = f"prompt[{k}]"
            error.message = f"prompt[{k}]: {error.message}"
        raise


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


class CompletionBuilder:
    def __init__(self, request_id: str, model: str, echoed: list[str], n: int, want_logprobs: bool):
        """`echoed`: each prompt's text to put in front of its choices' text ("" without echo)."""
        self.request_id, self.model, self.echoed, self.n = request_id, model, echoed, n
        self.want_logprobs = want_logprobs
        self.created = now()
        self.offsets: dict[int, int] = {}

    def prompt_text(self, index: int) -> str:
        return self.echoed[index // self.n]

    def logprobs(self, index: int, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        result = CompletionLogprobs()
        offset = self.offsets.get(index, len(self.prompt_text(index)))
        for lp in logprobs or ():
            result.tokens.append(lp.token)
            result.token_logprobs.append(lp.logprob)
            # the legacy API always lists the sampled token among the top ones: up to logprobs + 1 entries (a top
            # token decoding to the same text keeps its own value)
            result.top_logprobs.append({lp.token: lp.logprob, **{top.token: top.logprob for top in lp.top}})
            result.text_offset.append(offset)
            offset += len(lp.token)
        self.offsets[index] = offset
        return result

    def full(self, output: CompletionOutput) -> CompletionChoice:
        return CompletionChoice(
            index=output.index,
            text=self.prompt_text(output.index) + output.text,
            logprobs=self.logprobs(output.index, output.logprobs),
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )

    def delta(self, output: CompletionOutput, first: bool) -> CompletionChoice | None:
        text = (self.prompt_text(output.index) if first else "") + output.delta_text
        if not text and not output.finished and not (self.want_logprobs and output.delta_logprobs):
            return None
        return CompletionChoice(
            index=output.index,
            text=text,
            logprobs=self.logprobs(output.index, output.delta_logprobs),
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None, include_usage: bool) -> str:
        response = CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk_payload(response, include_usage))


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
            delta = builder.delta(choice, first=choice.index not in started)
            if delta is not None:
                started.add(choice.index)
                yield builder.chunk([delta], None, include_usage)
    except EngineStreamFailed as failure:
        yield sse_api_error(failure.error)
        yield DONE
        return
    if include_usage:
        yield builder.chunk([], usage_of(last), include_usage)
    yield DONE
