"""/v1/responses against the fake engine: the chat request it amounts to, the response object, the stream events,
and the fields it refuses by name."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.server.conftest import data_url, image_bytes

EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def respond(client, **fields):
    return client.post("/v1/responses", json={"model": "fake-model", "input": "Say hello", **fields})


def chat_text(client, messages, **fields) -> str:
    body = {"messages": messages, **fields}
    return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_a_response_holds_the_chat_answer_and_its_usage(client, fake_engine):
    body = respond(
        client, instructions="Be brief.", max_output_tokens=50, temperature=0, metadata={"k": "v"}
    ).json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    message = body["output"][0]
    assert (
        message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    )
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["annotations"] == []
    expected = chat_text(
        client,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        max_tokens=50,
        temperature=0,
    )
    assert message["content"][0]["text"] == expected
    usage = body["usage"]
    inputs, params = list(fake_engine.requests.values())[0]
    assert usage["input_tokens"] == len(inputs.prompt_token_ids) and usage["output_tokens"] == 11
    assert (
        usage["total_tokens"] == usage["input_tokens"] + 11
        and usage["output_tokens_details"]["reasoning_tokens"] == 0
    )
    assert (params.max_tokens, params.temperature) == (50, 0.0) and body["metadata"] == {"k": "v"}
    assert fake_engine.processor.calls[0][0][0] == {"role": "system", "content": "Be brief."}


def test_messages_with_text_and_image_parts_become_chat_parts(client, fake_engine):
    url = data_url(image_bytes())
    body = respond(
        client,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": url, "detail": "low"},
                ],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "A square."}],
            },
            {"role": "user", "content": "And its colour?"},
        ],
    ).json()
    assert body["status"] == "completed", body
    messages, _ = fake_engine.processor.calls[0]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][1]["type"] == "image" and messages[0]["content"][1]["max_patches"] == 1
    assert messages[1]["content"] == [{"type": "text", "text": "A square."}]
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 259


def test_cut_at_max_output_tokens_the_response_is_incomplete(client):
    body = respond(client, max_output_tokens=3).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["usage"]["output_tokens"] == 3


def test_text_format_json_schema_is_the_constraint(client, fake_engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}}
    body = respond(client, text=text).json()
    assert body["text"] == text
    _, params = list(fake_engine.requests.values())[0]
    assert params.structured_outputs.json == schema


def stream_events(response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if block:
            event_line, data_line = block.split("\n")
            events.append((event_line[len("event: ") :], json.loads(data_line[len("data: ") :])))
    return events


def test_the_stream_sends_the_responses_events_in_order(client):
    events = stream_events(respond(client, stream=True, temperature=0))
    names = [name for name, _ in events]
    assert [n for n in dict.fromkeys(names)] == EVENTS and names.count("response.output_text.delta") == 11
    assert all(name == data["type"] for name, data in events)
    # the message comes with no part: content_part.added brings its one part (clients append it to the item)
    added = next(data for name, data in events if name == "response.output_item.added")
    assert added["item"]["content"] == [] and added["item"]["status"] == "in_progress"
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    done = events[-1][1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == deltas
    text_done = next(data for name, data in events if name == "response.output_text.done")
    assert text_done["text"] == deltas and done["usage"]["output_tokens"] == 11
    assert deltas == chat_text(client, [{"role": "user", "content": "Say hello"}], temperature=0)


def test_the_official_client_reads_responses_and_their_stream(client):
    sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    response = sdk.responses.create(model="fake-model", input="Say hello", temperature=0)
    assert response.output_text == "Hello there, I see a cat on the mat."
    assert response.usage.input_tokens > 0 and response.status == "completed"
    events = list(sdk.responses.create(model="fake-model", input="Say hello", temperature=0, stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == response.output_text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {
                "input": [
                    {
                        "role": "assistant",
                        "content": [{"type": "input_image", "image_url": "https://a.b/c.png"}],
                    }
                ]
            },
            "input[0].content[0]",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "ftp://a.b/c.png"}]}
                ],
                "instructions": "x",
            },
            "input[0].content[0].image_url",
        ),
        ({"max_output_tokens": 100000}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "A"}}}, "text.format"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"input": []}, "input"),
        ({"input": [1]}, "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ],
)
def test_what_the_stateless_server_cannot_do_is_a_400_naming_the_field(client, fields, param):
    response = respond(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert "max_completion_tokens" not in error["message"] and "messages[" not in error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"metadata": {"a": "\ud800"}},
        {"metadata": {"\udfff": "v"}},
        {"text": {"format": {"type": "json_schema", "name": "A", "schema": {"description": "\ud800"}}}},
    ],
)
def test_lone_surrogates_in_echoed_fields_are_400s(client, fields):
    """Dict keys and values too: the response echoes metadata and the format (they failed to serialize: a 500)."""
    body = json.dumps({"input": "x", **fields})  # sent as the escape "\ud800"
    response = client.post("/v1/responses", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "Unicode" in response.json()["error"]["message"], response.text


def test_a_text_or_json_object_format_takes_no_schema(client):
    for kind in ("text", "json_object"):
        response = respond(client, text={"format": {"type": kind, "schema": {"type": "object"}}})
        assert response.status_code == 400 and response.json()["error"]["param"] == "text.format", (
            response.text
        )
    assert respond(client, text={"format": {"type": "json_object"}}).status_code == 200


def test_usage_details_hold_every_field_the_sdks_types_require(client):
    from openai.types.responses import Response

    body = respond(client, prompt_cache_retention="24h").json()
    assert body["usage"]["input_tokens_details"]["cache_write_tokens"] == 0
    Response.model_validate(body, strict=True)


def test_a_failed_stream_keeps_what_it_sent(client, fake_engine):
    fake_engine.fail_with, fake_engine.fail_from_step = "the engine broke", 2
    with client.stream("POST", "/v1/responses", json={"input": "Say hello", "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas and events[-1]["type"] == "response.failed", events[-1]
    output = events[-1]["response"]["output"]
    assert output[0]["status"] == "incomplete" and output[0]["content"][0]["text"] == deltas


def test_a_prompt_too_long_is_told_to_shorten_the_input(client):
    response = respond(client, input="word " * 5000)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "input", error
    assert "shorten the input" in error["message"] and "messages" not in error["message"], error
