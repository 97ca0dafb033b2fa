"""/v1/chat/completions: OpenAI messages -> EngineInputs + SamplingParams; RequestOutputs -> responses or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response

from .answers import EngineStreamFailed, check_engine_error, choice_updates, usage_of
from .chat_inputs import build_chat_inputs
from .engine_api import (
    CompletionOutput,
    EngineInputs,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from .errors import bad_request
from .prompt_logprobs import check_prompt_logprob_values, prompt_logprobs_field
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
    Usage,
    now,
    random_id,
    unsupported_chat_fields,
)
from .request_flow import (
    ClientDisconnected,
    generate,
    respond,
    unless_disconnected,
)
from .sampling import build_sampling_params, resolve_max_tokens
from .state import ServerState
from .streaming import DONE, chunk_payload, sse, sse_api_error
from .structured_outputs import Constraint, constrained, constraint_param, requested_constraint
from .videos import video_options


async def create_chat_completion(
    state: ServerState, request: ChatCompletionRequest, raw: Request
) -> Response:
    arrival = time.monotonic()
    state.check_model(request.model)
    problem = unsupported_chat_fields(request)
    if problem is not None:
        raise bad_request(problem[1], problem[0])
    constraint = requested_constraint(request)
    state.engine.check_capacity()  # before fetching and decoding media for a request that would get a 503
    try:  # a client that leaves while its images wait for the pixel budget gives its place back
        inputs = await unless_disconnected(
            build_chat_inputs(state, request.messages, request.max_tiles_per_image, video_options(request)),
            raw,
        )
        inputs.cache_salt = request.cache_salt
    except ClientDisconnected:
        return Response(status_code=499)
    state.metrics.observe(state.metrics.preprocess_time, time.monotonic() - arrival)
    params = chat_sampling_params(state, request, inputs, constraint)
    request_id = random_id("chatcmpl")
    outputs = generate(state, inputs, params, request_id, arrival)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return await constrained(
        state,
        constraint,
        respond(
            outputs,
            raw,
            bool(request.stream),
            stream_body=lambda first: stream_chat(
                outputs,
                first,
                request_id,
                state.model_id,
                params,
                include_usage,
                constraint_param(constraint),
            ),
            whole=lambda final: chat_response(
                final, request_id, state.model_id, want_logprobs=bool(request.logprobs)
            ),
        ),
    )


def chat_sampling_params(
    state: ServerState,
    request: ChatCompletionRequest,
    inputs: EngineInputs,
    constraint: Constraint | None = None,
) -> SamplingParams:
    field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(
        getattr(request, field),
        len(inputs.prompt_token_ids),
        inputs.num_image_tokens,
        state.max_model_len,
        tokens_field=field,
    )
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    if request.prompt_logprobs is not None:
        values = len(inputs.prompt_token_ids) * (request.prompt_logprobs + 1)
        check_prompt_logprob_values(values, "prompt_logprobs")
    return build_sampling_params(
        request,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=request.prompt_logprobs,
        vocab_size=state.vocab_size,
        structured_outputs=constraint.params if constraint is not None else None,
    )


# ---------------------------------------------------------------------------------------------- the response


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs:
    content = [
        ChatTokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=lp.bytes,
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in lp.top],
        )
        for lp in logprobs or ()
    ]
    return ChoiceLogprobs(content=content)


def chat_response(
    final: RequestOutput | None, request_id: str, model: str, want_logprobs: bool
) -> ChatCompletionResponse:
    final = check_engine_error(final, request_id)
    choices = [
        ChatChoice(
            index=o.index,
            message=AssistantMessage(content=o.text),
            logprobs=chat_logprobs(o.logprobs) if want_logprobs else None,
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in sorted(final.outputs, key=lambda o: o.index)
    ]
    prompt_logprobs = None if final.prompt_logprobs is None else prompt_logprobs_field(final.prompt_logprobs)
    return ChatCompletionResponse(
        id=request_id,
        created=now(),
        model=model,
        choices=choices,
        usage=usage_of(final),
        prompt_logprobs=prompt_logprobs,
    )


# --------------------------------------------------------------------------------------------------- streaming


class ChatChunker:
    """Builds the chunks of one streamed answer."""

    def __init__(self, request_id: str, model: str, want_logprobs: bool):
        self.request_id, self.model, self.want_logprobs = request_id, model, want_logprobs
        self.created = now()

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def role(self, index: int) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))

    def delta(self, output: CompletionOutput) -> ChatChunkChoice | None:
        if not output.delta_text and not (self.want_logprobs and output.delta_logprobs):
            return None
        logprobs = chat_logprobs(output.delta_logprobs) if self.want_logprobs else None
        return ChatChunkChoice(
            index=output.index, delta=DeltaMessage(content=output.delta_text), logprobs=logprobs
        )

    def finish(self, output: CompletionOutput) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=output.index,
            delta=DeltaMessage(),
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )


async def stream_chat(
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    request_id: str,
    model: str,
    params: SamplingParams,
    include_usage: bool,
    refused_param: str | None = None,
) -> AsyncIterator[str]:
    chunker = ChatChunker(request_id, model, want_logprobs=params.logprobs is not None)

    def emit(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(chunk_payload(chunker.chunk(choices, usage), include_usage))

    last = first
    async with aclosing(outputs):  # closes (so aborts) the request even if the client leaves during the roles
        for index in range(params.n):
            yield emit([chunker.role(index)])
        try:
            async for output, choice in choice_updates(first, outputs, refused_param):
                last = output
                delta = chunker.delta(choice)
                if delta is not None:
                    yield emit([delta])
                if choice.finished:
                    yield emit([chunker.finish(choice)])
        except EngineStreamFailed as failure:
            yield sse_api_error(failure.error)
            yield DONE
            return
    if include_usage:
        yield emit([], usage_of(last))
    yield DONE
