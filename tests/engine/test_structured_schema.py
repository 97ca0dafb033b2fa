"""Which JSON-schema keywords are refused: exactly those xgrammar compiles without enforcing. Each refused case
is compiled with xgrammar directly and an instance that breaks the keyword still matches; if a newer xgrammar
starts enforcing one, its case fails here and the keyword can be allowed."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from ovis2.engine.structured.schema_support import unenforced_feature

REFUSED = [  # (schema, an instance that breaks it)
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]"),
    ({"type": "number", "multipleOf": 0.5}, "0.3"),
    ({"type": "number", "multipleOf": 2}, "3"),
    ({"not": {"type": "string"}}, '"x"'),
    ({"if": {"type": "string"}, "then": {"minLength": 3}}, '"x"'),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "1"),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        '{"a":1}',
    ),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentSchemas": {"a": {"required": ["b"]}},
        },
        '{"a":1}',
    ),
    ({"$defs": {"a": {"$anchor": "A", "type": "integer"}}, "$ref": "#A"}, '"s"'),
]


def matches(grammars, schema, text: str) -> bool:
    compiled = grammars._get_backend("json").compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":")
    )
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize(("schema", "breaking"), REFUSED, ids=[next(iter(s)) for s, _ in REFUSED])
def test_each_refused_keyword_is_one_xgrammar_does_not_enforce(grammars, schema, breaking):
    assert matches(grammars, schema, breaking)  # xgrammar lets the breaking instance through...
    assert unenforced_feature(schema) is not None  # ...so the schema is refused


class Item(BaseModel):
    name: str = Field(max_length=8)
    cents: int = Field(ge=0, le=9999, multiple_of=5)


class Order(BaseModel):
    items: list[Item] = Field(max_length=3)
    note: str | None = None


ENFORCED = [  # (schema, an instance that breaks it)
    (Order.model_json_schema(), '{"items":[{"name":"a","cents":7}],"note":null}'),
    ({"type": "string", "format": "date"}, '"nope"'),
    ({"type": "string", "pattern": "^[0-9]+$"}, '"ab"'),
    ({"allOf": [{"type": "integer"}]}, '"s"'),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "true"),
    ({"type": "object", "properties": {"not": {"type": "integer"}}, "required": ["not"]}, '{"not":"x"}'),
]


@pytest.mark.parametrize(("schema", "breaking"), ENFORCED, ids=range(len(ENFORCED)))
def test_keywords_xgrammar_enforces_pass(grammars, schema, breaking):
    assert unenforced_feature(schema) is None
    assert not matches(grammars, schema, breaking)


def test_the_problem_names_where_it_is():
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "uniqueItems": True}},
        "$defs": {"Price": {"type": "number", "multipleOf": 0.01}},
    }
    assert unenforced_feature(schema).startswith("#/properties/tags: unique array items")
    del schema["properties"]["tags"]["uniqueItems"]
    assert unenforced_feature(schema).startswith("#/$defs/Price: 'multipleOf'")
    assert unenforced_feature({"type": "array", "uniqueItems": False}) is None
