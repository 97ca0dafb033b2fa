"""Structured-output fields against the fake engine: each wire form reaches the engine as the same constraint,
and a constraint the engine cannot compile is a 400 naming the field it came from."""

from __future__ import annotations

import pytest

from ovis2 import StructuredOutputError, StructuredOutputsParams
from tests.live_server import parse_metrics

TEXT = [{"role": "user", "content": "Say hello"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def constraint_of(fake_engine) -> StructuredOutputsParams | None:
    _, params = list(fake_engine.requests.values())[-1]
    return params.structured_outputs


@pytest.mark.parametrize(
    ("fields", "kind", "value"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "A", "schema": SCHEMA, "strict": True},
                }
            },
            "json",
            SCHEMA,
        ),
        ({"response_format": {"type": "json_object"}}, "json_object", True),
        ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA),
        ({"structured_outputs": {"regex": r"\d+"}}, "regex", r"\d+"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", 'root ::= "a"'),
        ({"structured_outputs": {"json_object": True}}, "json_object", True),
        ({"guided_json": SCHEMA}, "json", SCHEMA),
        ({"guided_regex": "a|b"}, "regex", "a|b"),
        ({"guided_choice": ["x"]}, "choice", ["x"]),
        ({"guided_grammar": 'root ::= "b"'}, "grammar", 'root ::= "b"'),
    ],
)
def test_every_wire_form_reaches_the_engine_as_one_constraint(client, fake_engine, fields, kind, value):
    response = client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 4, **fields})
    assert response.status_code == 200, response.text
    constraint = constraint_of(fake_engine)
    assert constraint.kind == kind and getattr(constraint, kind) == value


def test_text_response_format_and_no_format_are_unconstrained(client, fake_engine):
    for fields in ({"response_format": {"type": "text"}}, {}):
        assert client.post("/v1/chat/completions", json={"messages": TEXT, **fields}).status_code == 200
        assert constraint_of(fake_engine) is None


def test_completions_take_the_same_fields(client, fake_engine):
    for fields in ({"response_format": {"type": "json_object"}}, {"guided_choice": ["a", "b"]}):
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, **fields})
        assert response.status_code == 200, response.text
    assert constraint_of(fake_engine).choice == ["a", "b"]


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": SCHEMA}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/chat/completions", {"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
        ("/v1/completions", {"guided_grammar": "root ::= b"}, "guided_grammar"),
    ],
)
def test_a_constraint_the_engine_cannot_compile_is_a_400_naming_its_field(
    client, fake_engine, route, fields, param
):
    fake_engine.crash_with = StructuredOutputError(
        "the regex cannot be compiled: The parenthesis is not closed."
    )
    body = {"messages": TEXT} if "chat" in route else {"prompt": "x"}
    for stream in (False, True):
        response = client.post(route, json={**body, "max_tokens": 4, "stream": stream, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "parenthesis is not closed" in error["message"]


def test_structured_requests_are_counted_by_kind(client):
    client.post("/v1/chat/completions", json={"messages": TEXT, "guided_regex": "a"})
    client.post("/v1/chat/completions", json={"messages": TEXT, "response_format": {"type": "json_object"}})
    client.post("/v1/chat/completions", json={"messages": TEXT, "guided_choice": ["b"]})
    metrics = parse_metrics(client.get("/metrics").text)
    assert metrics['ovis2_structured_requests_total{kind="regex"}'] == 1
    assert metrics['ovis2_structured_requests_total{kind="json_object"}'] == 1
    assert metrics["ovis2_grammar_compile_seconds_count"] == 0  # the fake engine compiles nothing
    assert "ovis2_grammar_cache_hits_total" in metrics
