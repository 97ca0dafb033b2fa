"""/v1/chat/completions: OpenAI messages -> EngineInputs + SamplingParams; RequestOutputs -> responses or SSE."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response

from .aio import finish_in_thread
from .engine_api import CompletionOutput, EngineInputs, RequestOutput, SamplingParams, TokenLogprob
from .errors import APIError, bad_request
from .media.media_loader import decoded_media, video_frame_counts
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    ImagePart,
    PromptTokensDetails,
    TextPart,
    TopLogprob,
    Usage,
    VideoPart,
    now,
    random_id,
    unsupported_chat_fields,
)
from .request_flow import ENGINE_FAILED, ClientDisconnected, failed, generate, respond, unless_disconnected
from .sampling import build_sampling_params, resolve_max_tokens
from .state import ServerState
from .streaming import DONE, chunk_payload, sse, sse_error
from .structured_outputs import Constraint, constrained, requested_constraint
from .videos import VideoOptions, checked_videos, video_options

logger = logging.getLogger("ovis2.server")


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    state.check_model(request.model)
    problem = unsupported_chat_fields(request)
    if problem is not None:
        raise bad_request(problem[1], problem[0])
    constraint = requested_constraint(request)
    try:  # a client that leaves while its images wait for the pixel budget gives its place back
        inputs = await unless_disconnected(build_chat_inputs(state, request.messages, request.max_tiles_per_image,
                                                             video_options(request)), raw)  # fmt: skip
    except ClientDisconnected:
        return Response(status_code=499)
    state.metrics.observe(state.metrics.preprocess_time, time.monotonic() - arrival)
    params = chat_sampling_params(state, request, inputs, constraint)
    request_id = random_id("chatcmpl")
    outputs = generate(state, inputs, params, request_id, arrival)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return await constrained(state, constraint, respond(
        outputs, raw, bool(request.stream),
        stream_body=lambda first: stream_chat(outputs, first, request_id, state.model_id, params, include_usage),
        whole=lambda final: chat_response(final, request_id, state.model_id, want_logprobs=bool(request.logprobs)),
    ))  # fmt: skip


# ------------------------------------------------------------------------------------------------- the prompt


def image_parts(messages: list[ChatMessage]) -> list[tuple[ImagePart, str]]:
    found = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    found.append((part, f"messages[{i}].content[{j}].image_url"))
    return found


def max_tiles(state: ServerState, requested: int | None) -> int | None:
    """The tile cap for this request's images: the request's, within the server's (low-detail images get 1), else
    the flag's, else None: the processor's default (the compat's; compat ovis gives 4 to each of several images).

    A request may lower the server's cap, never raise it, whether the cap is the flag or the compat's default."""
    server_cap = state.max_tiles_per_image
    if requested is not None and server_cap is not None and requested > server_cap:
        raise bad_request(f"max_tiles_per_image is {requested}; this server allows at most {server_cap}",
                          "max_tiles_per_image")  # fmt: skip
    return requested if requested is not None else state.settings.max_tiles_per_image


def processor_messages(messages: list[ChatMessage], image_fields: list[dict], video_fields: list[dict] = ()) -> list[dict]:
    """OpenAI messages in the processor's form: image parts carry, in order, `image_fields` (the decoded image,
    `{"image": img}`, or only its size, `{"image_size": (w, h)}`), video parts `video_fields` (the sampled frames,
    `{"video": [img, ...]}`, or only their count and size)."""
    pending, pending_videos = iter(image_fields), iter(video_fields)
    result = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            result.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                low = part.image_url.detail == "low"  # one crop: the thumbnail, 259 tokens
                parts.append({"type": "image", **next(pending), **({"max_patches": 1} if low else {})})
            elif isinstance(part, VideoPart):
                parts.append({"type": "video", **next(pending_videos)})
        result.append({"role": role, "content": parts})
    return result


def checked_images(state: ServerState, messages: list[ChatMessage], requested_tiles: int | None):
    """(the image URLs with their params, the tile cap): the request's images within the server's limits."""
    found = image_parts(messages)
    limit = state.settings.max_images_per_request
    if len(found) > limit:
        raise bad_request(f"the request has {len(found)} images; at most {limit} are allowed", "messages")
    return [(part.image_url.url, param) for part, param in found], max_tiles(state, requested_tiles)


async def build_chat_inputs(
    state: ServerState, messages: list[ChatMessage], requested_tiles: int | None, video: VideoOptions = VideoOptions()
) -> EngineInputs:
    """Fetch and decode every image and video at once, then let the processor build the prompt (in a thread)."""
    urls, tiles = checked_images(state, messages, requested_tiles)
    videos = checked_videos(state, messages, video)
    frames_cap = state.settings.max_video_frames_per_request
    async with decoded_media(state.images, state.videos, urls, videos, frames_cap) as (images, frames):
        prompt = processor_messages(messages, [{"image": image} for image in images],
                                    [{"video": list(f), "num_frames": len(f)} for f in frames])  # fmt: skip
        return await finish_in_thread(state.engine.processor.prepare_chat, prompt, tiles)


async def chat_token_ids(
    state: ServerState, messages: list[ChatMessage], requested_tiles: int | None, video: VideoOptions = VideoOptions()
) -> tuple[list[int], int]:
    """(prompt ids, image and frame tokens) from the images' sizes alone, fetched and header-checked, and the
    videos' frame counts, from their packets: nothing is decoded."""
    urls, tiles = checked_images(state, messages, requested_tiles)
    videos = checked_videos(state, messages, video)
    sizes = await state.images.sizes(urls)
    counts = await video_frame_counts(state.videos, videos)
    prompt = processor_messages(messages, [{"image_size": size} for size in sizes],
                                [{"num_frames": n, "frame_size": size} for n, size in counts])  # fmt: skip
    return await finish_in_thread(state.engine.processor.chat_token_ids, prompt, tiles)


def chat_sampling_params(state: ServerState, request: ChatCompletionRequest, inputs: EngineInputs,
                         constraint: Constraint | None = None) -> SamplingParams:  # fmt: skip
    requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    try:
        max_tokens = resolve_max_tokens(
            requested, len(inputs.prompt_token_ids), inputs.num_image_tokens, state.max_model_len
        )
    except APIError as exc:
        if exc.param == "max_tokens" and request.max_completion_tokens is not None:
            exc.param = "max_completion_tokens"
        raise
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return build_sampling_params(request, max_tokens=max_tokens, logprobs=logprobs, vocab_size=state.vocab_size,
                                 structured_outputs=constraint.params if constraint is not None else None)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the response


def usage_of(output: RequestOutput) -> Usage:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(o.token_ids) for o in output.outputs)
    details = PromptTokensDetails(cached_tokens=output.num_cached_tokens, image_tokens=output.num_image_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=details)  # fmt: skip


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs:
    content = [
        ChatTokenLogprob(
            token=lp.token, logprob=lp.logprob, bytes=lp.bytes,
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in lp.top],
        )
        for lp in logprobs or ()
    ]  # fmt: skip
    return ChoiceLogprobs(content=content)


def check_engine_error(output: RequestOutput | None, request_id: str) -> RequestOutput:
    if output is None:
        logger.error("request %s ended without output", request_id)
        raise APIError(ENGINE_FAILED, 500)
    if failed(output):
        logger.error("request %s failed in the engine: %s", request_id, output.error)
        raise APIError(ENGINE_FAILED, 500)
    return output


def chat_response(
    final: RequestOutput | None, request_id: str, model: str, want_logprobs: bool
) -> ChatCompletionResponse:
    final = check_engine_error(final, request_id)
    choices = [
        ChatChoice(
            index=o.index, message=AssistantMessage(content=o.text),
            logprobs=chat_logprobs(o.logprobs) if want_logprobs else None,
            finish_reason=o.finish_reason, stop_reason=o.stop_reason,
        )
        for o in sorted(final.outputs, key=lambda o: o.index)
    ]  # fmt: skip
    return ChatCompletionResponse(id=request_id, created=now(), model=model, choices=choices, usage=usage_of(final))


# --------------------------------------------------------------------------------------------------- streaming


class ChatChunker:
    """Builds the chunks of one streamed answer."""

    def __init__(self, request_id: str, model: str, want_logprobs: bool):
        self.request_id, self.model, self.want_logprobs = request_id, model, want_logprobs
        self.created = now()

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)  # fmt: skip

    def role(self, index: int) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))

    def delta(self, output: CompletionOutput) -> ChatChunkChoice | None:
        if not output.delta_text and not (self.want_logprobs and output.delta_logprobs):
            return None
        logprobs = chat_logprobs(output.delta_logprobs) if self.want_logprobs else None
        return ChatChunkChoice(index=output.index, delta=DeltaMessage(content=output.delta_text), logprobs=logprobs)

    def finish(self, output: CompletionOutput) -> ChatChunkChoice:
        return ChatChunkChoice(index=output.index, delta=DeltaMessage(), finish_reason=output.finish_reason,
                               stop_reason=output.stop_reason)  # fmt: skip


async def stream_chat(
    outputs: AsyncIterator[RequestOutput], first: RequestOutput, request_id: str, model: str,
    params: SamplingParams, include_usage: bool,
) -> AsyncIterator[str]:  # fmt: skip
    chunker = ChatChunker(request_id, model, want_logprobs=params.logprobs is not None)

    def emit(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(chunk_payload(chunker.chunk(choices, usage), include_usage))

    last = first
    async with aclosing(outputs):  # closes (so aborts) the request even if the client leaves during the roles
        for index in range(params.n):
            yield emit([chunker.role(index)])
        try:
            async for output, choice in choice_updates(first, outputs, request_id):
                last = output
                delta = chunker.delta(choice)
                if delta is not None:
                    yield emit([delta])
                if choice.finished:
                    yield emit([chunker.finish(choice)])
        except EngineStreamFailed:
            yield sse_error(ENGINE_FAILED)
            yield DONE
            return
    if include_usage:
        yield emit([], usage_of(last))
    yield DONE


class EngineStreamFailed(Exception):
    """The engine failed this request in the middle of its stream."""


async def choice_updates(
    first: RequestOutput, rest: AsyncIterator[RequestOutput], request_id: str
) -> AsyncIterator[tuple[RequestOutput, CompletionOutput]]:
    """(output, choice) for each update of a choice, up to and including the one that finishes it."""
    finished: set[int] = set()
    async with aclosing(rest):
        async for output in prepend(first, rest):
            if failed(output):
                logger.error("request %s failed in the engine: %s", request_id, output.error)
                raise EngineStreamFailed()
            for choice in output.outputs:
                if choice.index not in finished:
                    finished.update([choice.index] if choice.finished else [])
                    yield output, choice


async def prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for output in rest:
        yield output
