"""Wire models of the OpenAI Responses API (`POST /v1/responses`), stateless: fields in the order of the reference.

Requests forbid unknown fields; fields the API has but this server does not implement (tools, stored responses,
conversations, reasoning...) parse so that `unsupported_response_fields` can name them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from .base import RequestModel, ResponseModel
from .structured import JSONSchema

# ------------------------------------------------------------------------------------------------ request


class InputText(RequestModel):
    type: Literal[
        "input_text", "output_text"
    ]  # output_text: an earlier answer sent back in an assistant message
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputImage(RequestModel):
    type: Literal["input_image"]
    image_url: str | None = None  # an http(s) or data URL, under the same media rules as chat
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"


class OtherPart(RequestModel):
    """input_file, input_audio, refusal...: parsed so the error can name them."""

    model_config = ConfigDict(extra="allow")
    type: str


# The unions below pick their member by the value's shape, so a malformed value gets the errors of the member it
# meant to be; their tags look like pydantic's own branch labels ('list[...]'), which errors.py leaves out of param.
def _part_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"input_text": "part[text]", "output_text": "part[text]", "input_image": "part[image]"}.get(
        kind, "part[other]"
    )


InputPart = Annotated[
    Annotated[InputText, Tag("part[text]")]
    | Annotated[InputImage, Tag("part[image]")]
    | Annotated[OtherPart, Tag("part[other]")],
    Discriminator(_part_kind),
]


def _text_or_list(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list[items]" if isinstance(value, list) else None


MessageContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[InputPart], Tag("list[items]")],
    Discriminator(
        _text_or_list,
        custom_error_type="message_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class InputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: MessageContent
    id: str | None = None  # an earlier output item sent back as it came
    status: str | None = None
    phase: str | None = None


class OtherItem(RequestModel):
    """function_call, function_call_output, reasoning, item_reference...: parsed so the error can name them."""

    model_config = ConfigDict(extra="allow")
    type: str


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return "item[message]" if kind == "message" else "item[other]"


InputItem = Annotated[
    Annotated[InputMessage, Tag("item[message]")] | Annotated[OtherItem, Tag("item[other]")],
    Discriminator(_item_kind),
]
Input = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[InputItem], Tag("list[items]")],
    Discriminator(
        _text_or_list,
        custom_error_type="input",
        custom_error_message="input must be a string or a list of messages",
    ),
]


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    schema_: JSONSchema | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        if self.type != "json_schema" and (self.schema_ is not None or self.name is not None or self.strict):
            raise ValueError(
                f"a {self.type} format takes no name, schema or strict (a json_schema format does)"
            )
        return self


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(RequestModel):
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    input: Input
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None  # a caching hint, as prompt_cache_key: no effect here
    reasoning: dict[str, Any] | None = None
    # A secret per tenant: the prefix and visual caches share only among requests with the same salt (vLLM's name).
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    text: TextConfig | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: Any) -> Any:
        if value == []:
            raise ValueError("input is an empty list; send a string or at least one message")
        return value


# ------------------------------------------------------------------------------------------------ response


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(ResponseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # the SDK's type requires it; nothing here is billed for writing the cache
    image_tokens: int = 0  # of input_tokens, the ones standing for images (an extension, as in chat's usage)


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseObject(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
