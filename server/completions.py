"""/v1/completions for plain text prompts (a string or token ids)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request, Response

from .chat import EngineStreamFailed, check_engine_error, choice_updates, usage_of
from .engine_api import IMAGE_TOKEN_IDS, CompletionOutput, EngineInputs, RequestOutput, TokenLogprob
from .errors import bad_request
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


async def create_completion(state: ServerState, request: CompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    state.check_model(request.model)
    check_unsupported(request)
    constraint = requested_constraint(request)
    prompt_ids = await asyncio.to_thread(prompt_token_ids, state, request.prompt)  # long prompts take seconds
    prompt_text = await echoed_prompt(state, request.prompt, prompt_ids) if request.echo else ""
    max_tokens = resolve_max_tokens(request.max_tokens, len(prompt_ids), 0, state.max_model_len, "prompt")
    params = build_sampling_params(
        request,
        max_tokens=max_tokens,
        logprobs=request.logprobs,
        vocab_size=state.vocab_size,
        structured_outputs=constraint.params if constraint is not None else None,
    )
    request_id = random_id("cmpl")
    outputs = generate(
        state,
        EngineInputs(prompt_token_ids=prompt_ids, cache_salt=request.cache_salt),
        params,
        request_id,
        arrival,
    )
    builder = CompletionBuilder(
        request_id, state.model_id, prompt_text, want_logprobs=request.logprobs is not None
    )
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


def single_prompt(prompt: str | list) -> str | list:
    """The one prompt of a list holding one (a string or token ids), else the prompt as sent."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        return prompt[0]
    return prompt


async def echoed_prompt(state: ServerState, prompt: str | list, prompt_ids: list[int]) -> str:
    """A text prompt as sent (decoding its ids would normalize it: the tokenizer applies NFC), or the text of
    token ids."""
    prompt = single_prompt(prompt)
    if isinstance(prompt, str):
        return prompt
    return await asyncio.to_thread(state.engine.tokenizer.decode, prompt_ids)


def prompt_token_ids(state: ServerState, prompt: str | list) -> list[int]:
    """One prompt: text (control tokens in it act as control tokens) or token ids; never image tokens."""
    prompt = single_prompt(prompt)
    if isinstance(prompt, list) and any(isinstance(p, str | list) for p in prompt):
        raise bad_request("send one prompt per request", "prompt")
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
    def __init__(self, request_id: str, model: str, prompt_text: str, want_logprobs: bool):
        self.request_id, self.model, self.prompt_text = request_id, model, prompt_text
        self.want_logprobs = want_logprobs
        self.created = now()
        self.offsets: dict[int, int] = {}

    def logprobs(self, index: int, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        result = CompletionLogprobs()
        offset = self.offsets.get(index, len(self.prompt_text))
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
            text=self.prompt_text + output.text,
            logprobs=self.logprobs(output.index, output.logprobs),
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )

    def delta(self, output: CompletionOutput, first: bool) -> CompletionChoice | None:
        text = (self.prompt_text if first else "") + output.delta_text
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
