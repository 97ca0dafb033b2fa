"""Wire models of /v1/chat/completions: the OpenAI request and response shapes, fields in the order of the OpenAI reference.

Requests forbid unknown fields, so a field this server does not implement is a 400 that names it instead
of being silently ignored. Fields that exist in OpenAI's API but would change the answer here (tools,
audio...) are accepted by the model and refused by `unsupported_fields`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from .base import RequestModel
from .structured import ResponseFormat, StructuredOutputsExtensions

# ---------------------------------------------------------------------------------------------- chat: request


class ImageURL(RequestModel):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImagePart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                'image_url must be an object, {"url": "https://..." or "data:image/...;base64,..."}, '
                "not a string"
            )
        return value


class VideoURL(RequestModel):
    url: str


class VideoPart(RequestModel):
    """vLLM's name for a video: http(s) URLs (the image rules) or data:video/<mp4|webm|quicktime|x-matroska>;base64."""

    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                'video_url must be an object, {"url": "https://..." or "data:video/mp4;base64,..."}, '
                "not a string"
            )
        return value


UNSUPPORTED_PART_TYPES = ("input_audio", "file", "refusal", "audio_url")


class UnsupportedPart(RequestModel):
    """Any other type: OpenAI's input_audio, file, refusal... parse, so that `unsupported_chat_fields` names them;
    a type OpenAI does not have is an error that says which types there are."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(json_schema_extra={"enum": list(UNSUPPORTED_PART_TYPES)})

    @field_validator("type")
    @classmethod
    def _a_known_type(cls, value: str) -> str:
        if value not in UNSUPPORTED_PART_TYPES:
            raise ValueError(f"{value!r} is not a content part type; use 'text', 'image_url' or 'video_url'")
        return value


# The two unions below pick their member by the value's shape (a part by its `type`), so a malformed value gets
# the errors of the member it meant to be, not one per member. The tags look like pydantic's own branch labels
# ('list[...]'), which errors.py leaves out of `param`.
def _part_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = {"type": getattr(value, "type", None)}
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    return f"part[{kind}]" if kind in ("text", "image_url", "video_url") else "part[other]"


ContentPart = Annotated[
    Annotated[TextPart, Tag("part[text]")]
    | Annotated[ImagePart, Tag("part[image_url]")]
    | Annotated[VideoPart, Tag("part[video_url]")]
    | Annotated[UnsupportedPart, Tag("part[other]")],
    Discriminator(
        _part_kind,
        custom_error_type="content_part",
        custom_error_message=(
            'a content part must be an object with a type, e.g. {"type": "text", "text": "..."}'
        ),
    ),
]


def _content_kind(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list[parts]" if isinstance(value, list) else None


MessageContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[ContentPart], Tag("list[parts]")],
    Discriminator(
        _content_kind,
        custom_error_type="message_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: MessageContent | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


class StreamOptions(RequestModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class SamplingExtensions(StructuredOutputsExtensions):
    """vLLM's names for the sampling knobs OpenAI does not have (and for structured outputs)."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    # each prompt token's logprob and the top k there, as `prompt_logprobs` in the answer (not when streaming)
    prompt_logprobs: int | None = None
    # A secret per tenant: the prefix and visual caches share only among requests with the same salt (vLLM's name).
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)


class ChatCompletionRequest(SamplingExtensions):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    audio: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    n: int | None = 1
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: float | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None  # a caching hint, as prompt_cache_key: no effect here
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: str | list[str] | None = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's range
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    user: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # Extension: the most tiles each image of this request may be cut into (at most the server's cap).
    max_tiles_per_image: int | None = Field(None, ge=1)
    # Extensions: frames sampled from each video (at most --max-video-frames; default 12, the Ovis2 recipe's) and,
    # optionally, frames per second of video (then num_video_frames caps the count).
    num_video_frames: int | None = Field(None, ge=1)
    video_fps: float | None = Field(None, gt=0.0, le=1000.0)

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return check_stream_options(self)


def unsupported_chat_fields(request: ChatCompletionRequest) -> tuple[str, str] | None:
    """The first field that would change the answer in a way this server does not implement."""
    if request.tools:
        return "tools", "tool calling is not supported"
    if request.functions:
        return "functions", "function calling is not supported"
    if request.function_call not in (None, "none"):
        return "function_call", "function calling is not supported"
    if request.tool_choice not in (None, "none", "auto"):
        return "tool_choice", "tool calling is not supported"
    if request.audio is not None or (request.modalities and set(request.modalities) != {"text"}):
        return "modalities", "only text output is supported"
    if request.prediction is not None:
        return "prediction", "predicted outputs are not supported"
    if request.reasoning_effort is not None:
        return "reasoning_effort", "this model does not reason; remove reasoning_effort"
    if request.web_search_options is not None:
        return "web_search_options", "web search is not supported"
    if request.verbosity is not None:
        return "verbosity", "verbosity is not supported"
    for i, message in enumerate(request.messages):
        problem = _unsupported_in_message(message, f"messages[{i}]")
        if problem:
            return problem
    return None


def _unsupported_in_message(message: ChatMessage, where: str) -> tuple[str, str] | None:
    if message.role in ("tool", "function"):
        return f"{where}.role", f"role '{message.role}' is not supported (no tool calling)"
    if message.tool_calls or message.function_call:
        return f"{where}.tool_calls", "tool calls are not supported"
    if message.audio is not None:
        return f"{where}.audio", "audio is not supported"
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if isinstance(part, UnsupportedPart):
                return f"{where}.content[{j}].type", f"content part type '{part.type}' is not supported"
            if isinstance(part, ImagePart) and message.role != "user":
                return f"{where}.content[{j}]", "images are only accepted in user messages"
            if isinstance(part, VideoPart) and message.role != "user":
                return f"{where}.content[{j}]", "videos are only accepted in user messages"
    if message.content is None and message.role != "assistant":
        return f"{where}.content", f"a {message.role} message needs content"
    return None


def check_stream_options(request):
    if request.stream_options is not None and not request.stream:
        raise ValueError("stream_options is only allowed with stream set to true")
    return request
