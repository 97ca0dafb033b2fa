"""A Responses API request as the chat request it amounts to: `instructions` and `input` become chat messages
(input_text -> text part, input_image -> image_url part), the sampling fields carry over, text.format becomes
the structured-output constraint. What the stateless server does not implement is refused by name."""

from __future__ import annotations

import re

from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest, ChatMessage, ImagePart, ImageURL, TextPart
from .protocol.responses import InputImage, InputMessage, OtherItem, OtherPart, ResponsesRequest
from .structured_outputs import Constraint

REFUSED = {  # field: (is it set to something this server cannot do, why)
    "background": (lambda v: bool(v), "background responses are not supported"),
    "conversation": (
        lambda v: v is not None,
        "conversations are not stored; send the whole conversation in input",
    ),
    "previous_response_id": (
        lambda v: v is not None,
        "responses are not stored; send the whole conversation in input",
    ),
    "store": (lambda v: bool(v), "responses are not stored; set store to false or leave it out"),
    "tools": (lambda v: bool(v), "tool calling is not supported"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"), "tool calling is not supported"),
    "prompt": (lambda v: v is not None, "stored prompt templates are not supported"),
    "reasoning": (lambda v: v is not None, "this model does not reason; remove reasoning"),
    "include": (lambda v: bool(v), "no extra output can be included"),
    "top_logprobs": (
        lambda v: v is not None,
        "logprobs are not supported on /v1/responses; use /v1/chat/completions",
    ),
    "truncation": (
        lambda v: v == "auto",
        "truncation 'auto' is not supported; the input must fit the context",
    ),
}


def unsupported_response_fields(request: ResponsesRequest) -> tuple[str, str] | None:
    """The first field that asks for something this server does not implement: (param, why)."""
    for name, (refused, why) in REFUSED.items():
        if refused(getattr(request, name)):
            return name, why
    if request.text is not None and request.text.verbosity is not None:
        return "text.verbosity", "verbosity is not supported"
    for i, item in enumerate(request.input if isinstance(request.input, list) else ()):
        problem = _unsupported_in_item(item, f"input[{i}]")
        if problem is not None:
            return problem
    return None


def _unsupported_in_item(item: InputMessage | OtherItem, where: str) -> tuple[str, str] | None:
    if isinstance(item, OtherItem):
        return f"{where}.type", f"input items of type '{item.type}' are not supported; send messages"
    for j, part in enumerate(item.content if isinstance(item.content, list) else ()):
        if isinstance(part, OtherPart):
            return f"{where}.content[{j}].type", f"content part type '{part.type}' is not supported"
        if isinstance(part, InputImage):
            if part.image_url is None:
                return (
                    f"{where}.content[{j}].image_url",
                    "an input_image needs an image_url (file ids are not kept)",
                )
            if item.role != "user":
                return f"{where}.content[{j}]", "images are only accepted in user messages"
    return None


def chat_messages(request: ResponsesRequest) -> tuple[list[ChatMessage], list[str]]:
    """-> (the chat messages, each one's field in the request: "instructions", "input" or "input[i]")."""
    messages, origins = [], []
    if request.instructions is not None:
        messages.append(ChatMessage(role="system", content=request.instructions))
        origins.append("instructions")
    if isinstance(request.input, str):
        return messages + [ChatMessage(role="user", content=request.input)], origins + ["input"]
    for i, item in enumerate(request.input):
        content = item.content if isinstance(item.content, str) else [_chat_part(p) for p in item.content]
        messages.append(ChatMessage(role=item.role, content=content))
        origins.append(f"input[{i}]")
    return messages, origins


def _chat_part(part) -> TextPart | ImagePart:
    if isinstance(part, InputImage):
        return ImagePart(type="image_url", image_url=ImageURL(url=part.image_url, detail=part.detail))
    return TextPart(type="text", text=part.text)


def chat_request(request: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    """The equivalent chat request (the same sampling, so the same answer)."""
    return ChatCompletionRequest(
        messages=messages,
        max_completion_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        user=request.user,
    )


def response_constraint(request: ResponsesRequest) -> Constraint | None:
    text_format = request.text.format if request.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return Constraint.build("text.format", json_object=True)
    return Constraint.build("text.format.schema", json=text_format.schema_)


def renamed(error: APIError, origins: list[str]) -> APIError:
    """A chat error's param as the Responses request names it (messages[1].content[0] -> input[0].content[0])."""
    param = error.param or ""
    if param in ("max_tokens", "max_completion_tokens"):
        error.param = "max_output_tokens"
        error.message = re.sub(r"\bmax_(completion_)?tokens\b", "max_output_tokens", error.message)
    elif param.startswith("messages[") and "]" in param:
        index, rest = param[len("messages[") :].split("]", 1)
        if index.isdigit() and int(index) < len(origins):
            error.param = origins[int(index)] + rest
    elif param == "messages":
        error.param = "input"
        error.message = error.message.replace("shorten the messages", "shorten the input")
    return error


def check_supported(request: ResponsesRequest) -> None:
    problem = unsupported_response_fields(request)
    if problem is not None:
        raise bad_request(problem[1], problem[0])
