"""Wire models for structured outputs: OpenAI's `response_format` and vLLM's `structured_outputs` extension (with
its older `guided_*` names). Turned into the engine's StructuredOutputsParams by server/structured_outputs.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import RequestModel

JSONSchema = dict[str, Any] | bool


class JSONSchemaFormat(RequestModel):
    """response_format.json_schema: what the OpenAI SDK's `chat.completions.parse(response_format=Model)` sends."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: JSONSchema | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give json_schema exactly when type is 'json_schema'")
        if self.json_schema is not None and self.json_schema.schema_ is None:
            raise ValueError("json_schema needs a schema")
        return self


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: JSONSchema | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (xgrammar's dialect, GBNF-like: `root ::= ...`)
    json_object: bool | None = None


class StructuredOutputsExtensions(RequestModel):
    """The extension fields, shared by chat and completions requests."""

    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: JSONSchema | str | None = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
