"""What shape a request's output must take: exactly one of a JSON schema, any JSON object, a regex, a choice among
strings or an EBNF grammar (vLLM's `structured_outputs` names). Plain data: compiled elsewhere."""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass, field
from typing import Any

from ...errors import StructuredOutputError
from .schema_limits import schema_shape_problem

MAX_CONSTRAINT_CHARS = 100_000  # a schema, regex or grammar; compiling grows with its size
MAX_CHOICES = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    json: dict | bool | str | None = None  # a JSON schema, or its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # one of these strings, exactly
    grammar: str | None = None  # EBNF in xgrammar's dialect (GBNF-like: `root ::= ...`)
    _source: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return self._given()[0]

    @property
    def schema(self) -> dict | bool | None:
        """The JSON schema as data (kind 'json'), else None."""
        if self.json is None:
            return None
        return jsonlib.loads(self.json) if isinstance(self.json, str) else self.json

    @property
    def source(self) -> str:
        """The constraint as one text: what is compiled, and the cache key with `kind`."""
        if self._source is None:
            self._source = self._render()
        return self._source

    @property
    def cache_key(self) -> tuple[str, str]:
        return self.kind, self.source

    def _given(self) -> list[str]:
        values = {
            "json": self.json is not None,
            "json_object": self.json_object,
            "regex": self.regex is not None,
            "choice": self.choice is not None,
            "grammar": self.grammar is not None,
        }
        return [kind for kind in KINDS if values[kind]]

    def _render(self) -> str:
        kind = self.kind
        if kind == "json":  # key order kept: properties are generated in the schema's order
            return jsonlib.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        if kind == "json_object":
            return '{"type":"object"}'
        if kind == "choice":
            return jsonlib.dumps(self.choice, ensure_ascii=False)
        return self.regex if kind == "regex" else self.grammar

    def validate(self) -> None:
        given = self._given()
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise StructuredOutputError(
                f"structured outputs take exactly one of {', '.join(KINDS)}; got {found}"
            )
        problem = _problem(given[0], getattr(self, given[0]))
        if problem is None and len(self.source) > MAX_CONSTRAINT_CHARS:
            problem = f"is {len(self.source)} characters; at most {MAX_CONSTRAINT_CHARS} are allowed"
        if problem is not None:
            raise StructuredOutputError(f"structured output '{given[0]}' {problem}")


def _problem(kind: str, value: Any) -> str | None:
    if kind == "json":
        return _schema_problem(value)
    if kind == "json_object":
        return None if value is True else "must be true"
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_CHOICES:
            return f"must be a list of 1 to {MAX_CHOICES} strings"
        return None if all(isinstance(c, str) and c for c in value) else "must hold non-empty strings only"
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _schema_problem(value: Any) -> str | None:
    if isinstance(value, str):
        try:
            value = jsonlib.loads(value)
        except ValueError as error:
            return f"is not valid JSON: {error}"
        except RecursionError:
            return "nests too deep to read"
    if not isinstance(value, (dict, bool)):
        return "must be a JSON schema: an object (or true/false)"
    if value is False:
        return "is the schema false, which no output satisfies"
    return schema_shape_problem(value)
