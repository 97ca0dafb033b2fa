"""Wire models of /v1/completions, /v1/models, /tokenize and /detokenize."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import RequestModel, ResponseModel
from .chat import ChatMessage, SamplingExtensions, StreamOptions, check_stream_options
from .chat_response import Usage
from .structured import ResponseFormat

# ------------------------------------------------------------------------------------------------ completions


class CompletionRequest(SamplingExtensions):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = 16
    n: int | None = 1
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # vLLM's extension of the completions API
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's range
    top_p: float | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_stream_options(self) -> CompletionRequest:
        return check_stream_options(self)


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, dict] | None] | None = None  # vLLM's: asked for with `prompt_logprobs`


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ----------------------------------------------------------------------------------------- models, tokenizer


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ovis2-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False
    max_tiles_per_image: int | None = Field(None, ge=1)
    num_video_frames: int | None = Field(None, ge=1)
    video_fps: float | None = Field(None, gt=0.0, le=1000.0)

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    image_tokens: int = 0


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str
