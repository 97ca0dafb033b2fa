"""/v1/responses (the OpenAI Responses API, stateless): served as the equivalent chat request, answered as a
`response` object or as the Responses stream events (`event:` + `data:` each, numbered by sequence_number)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

from fastapi import Request, Response

from .answers import EngineStreamFailed, check_engine_error, choice_updates, usage_of
from .chat import chat_sampling_params
from .chat_inputs import build_chat_inputs
from .engine_api import RequestOutput
from .errors import APIError
from .protocol import now, random_id
from .protocol.responses import (
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from .request_flow import ClientDisconnected, generate, respond, unless_disconnected
from .responses_input import chat_messages, chat_request, check_supported, renamed, response_constraint
from .state import ServerState
from .streaming import sse_event
from .structured_outputs import constrained


async def create_response(state: ServerState, request: ResponsesRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    state.check_model(request.model)
    check_supported(request)
    constraint = response_constraint(request)
    messages, origins = chat_messages(request)
    chat = chat_request(request, messages)
    state.engine.check_capacity()  # before fetching and decoding media for a request that would get a 503
    try:
        inputs = await unless_disconnected(build_chat_inputs(state, chat.messages, None), raw)
        inputs.cache_salt = request.cache_salt
        state.metrics.observe(state.metrics.preprocess_time, time.monotonic() - arrival)
        params = chat_sampling_params(state, chat, inputs, constraint)
    except ClientDisconnected:
        return Response(status_code=499)
    except APIError as error:
        raise renamed(error, origins) from None
    builder = ResponseBuilder(random_id("resp", "_"), state.model_id, request)
    outputs = generate(state, inputs, params, builder.response_id, arrival)
    return await constrained(
        state,
        constraint,
        respond(
            outputs,
            raw,
            bool(request.stream),
            stream_body=lambda first: stream_response(outputs, first, builder),
            whole=lambda final: builder.finished(check_engine_error(final, builder.response_id)),
        ),
    )


class ResponseBuilder:
    """The `response` object of one request at each stage, and its stream events."""

    def __init__(self, response_id: str, model: str, request: ResponsesRequest) -> None:
        self.response_id, self.model, self.request = response_id, model, request
        self.message_id = random_id("msg", "_")
        self.created_at = now()
        self._sequence = itertools.count()

    def response(self, status: str, output: list[OutputMessage] | None = None, **fields) -> ResponseObject:
        request = self.request
        text_format = request.text.format if request.text is not None and request.text.format else None
        return ResponseObject(
            id=self.response_id,
            created_at=self.created_at,
            status=status,
            model=self.model,
            output=output or [],
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            metadata=request.metadata or {},
            temperature=request.temperature,
            top_p=request.top_p,
            text={
                "format": text_format.model_dump(by_alias=True, exclude_none=True)
                if text_format
                else {"type": "text"}
            },
            user=request.user,
            **fields,
        )

    def message(self, text: str | None, status: str) -> OutputMessage:
        """The output message; with text None, one with no content part yet (the stream's first sight of it)."""
        content = [] if text is None else [OutputText(text=text)]
        return OutputMessage(id=self.message_id, status=status, content=content)

    def finished(self, final: RequestOutput, text: str | None = None) -> ResponseObject:
        """The whole response once the engine is done; cut at max_output_tokens it is 'incomplete'."""
        choice = final.outputs[0]
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        usage = usage_of(final)
        details = usage.prompt_tokens_details
        return self.response(
            status,
            [self.message(choice.text if text is None else text, status)],
            completed_at=now() if status == "completed" else None,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            usage=ResponseUsage(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                input_tokens_details=InputTokensDetails(
                    cached_tokens=details.cached_tokens, image_tokens=details.image_tokens
                ),
            ),
        )

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(self._sequence)}
        for name, value in fields.items():
            payload[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        return sse_event(kind, payload)

    def text_event(self, kind: str, **fields) -> str:
        return self.event(kind, item_id=self.message_id, output_index=0, content_index=0, **fields)


async def stream_response(
    outputs: AsyncIterator[RequestOutput], first: RequestOutput, builder: ResponseBuilder
) -> AsyncIterator[str]:
    """created, in_progress, output_item.added, content_part.added, output_text.delta..., output_text.done,
    content_part.done, output_item.done, then completed (or incomplete; failed if the engine fails)."""
    yield builder.event("response.created", response=builder.response("in_progress"))
    yield builder.event("response.in_progress", response=builder.response("in_progress"))
    yield builder.event(
        "response.output_item.added", output_index=0, item=builder.message(None, "in_progress")
    )
    yield builder.text_event("response.content_part.added", part=OutputText(text=""))
    text, last = "", first
    try:
        async for output, choice in choice_updates(first, outputs):
            last = output
            if choice.delta_text:
                text += choice.delta_text
                yield builder.text_event("response.output_text.delta", delta=choice.delta_text, logprobs=[])
    except EngineStreamFailed as failure:
        code = "invalid_prompt" if failure.error.status < 500 else "server_error"
        error = {"code": code, "message": failure.error.message}
        # the message as far as it was streamed (the SDK's snapshot keeps an output only when the event has one)
        output = [builder.message(text, "incomplete")]
        yield builder.event("response.failed", response=builder.response("failed", output, error=error))
        return
    final = builder.finished(last, text)
    yield builder.text_event("response.output_text.done", text=text, logprobs=[])
    yield builder.text_event("response.content_part.done", part=OutputText(text=text))
    yield builder.event("response.output_item.done", output_index=0, item=final.output[0])
    yield builder.event(f"response.{final.status}", response=final)
