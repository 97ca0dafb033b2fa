"""Every bad input gets its status and the OpenAI error envelope, and the server keeps serving."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from ovis2 import EngineDeadError
from server.app import create_app
from server.settings import ServerSettings
from tests.server.conftest import data_url, image_bytes, image_message

TEXT = [{"role": "user", "content": "hi"}]


def assert_error(response, status: int, param: str | None = "__any__", words: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "__any__":
        assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    return error


BAD_CHAT_FIELDS = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": 5}, "cache_salt"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"not_a_field": 1}, "not_a_field"),
    ({"stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "messages[0].content[0].type",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        {
            "messages": [
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
            ]
        },
        "messages[0].content[0]",
    ),
    ({"max_tiles_per_image": 0}, "max_tiles_per_image"),
]


def test_an_engine_range_error_names_the_chat_field_that_was_sent(client):
    body = {"messages": TEXT, "logprobs": True, "top_logprobs": 21}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "top_logprobs")
    assert "'top_logprobs'" in error["message"] and "'logprobs'" not in error["message"], error


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, 100000])
def test_an_output_budget_error_names_the_field_that_was_sent(client, field, value):
    body = {"messages": TEXT, field: value}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, field)
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    assert error["message"].startswith(field) and other not in error["message"], error


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"top_logprobs": 2}, "top_logprobs"), ({"stream_options": {"include_usage": True}}, "stream_options")],
)
def test_a_check_of_the_whole_request_names_the_field_its_message_is_about(client, fields, param):
    error = assert_error(client.post("/v1/chat/completions", json={"messages": TEXT, **fields}), 400, param)
    assert error["message"].startswith(param + " ") and error["message"].count(param) == 1, error
    if param == "stream_options":  # the completions API checks it alike
        error = assert_error(client.post("/v1/completions", json={"prompt": "hi", **fields}), 400, param)
        assert error["message"].startswith(param + " "), error


@pytest.mark.parametrize(
    ("fields", "param"), BAD_CHAT_FIELDS, ids=[str(i) for i in range(len(BAD_CHAT_FIELDS))]
)
def test_bad_chat_fields_are_400_naming_the_field(client, fields, param):
    body = {"model": "fake-model", "messages": TEXT, **fields}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "__any__")
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or param in error["message"], error
    assert client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1}).status_code == 200


BAD_IMAGES = [
    ("ftp://example.com/a.png", "http(s)"),
    ("file:///etc/passwd", "file://"),
    ("data:text/plain;base64,aGk=", "type"),
    ("data:image/png,notbase64", "data URL"),
    ("data:image/png;base64,@@@@", "base64"),
    (data_url(b"not an image at all"), "not a png"),
    (data_url(image_bytes()[:60]), "corrupt"),
    (data_url(image_bytes("TIFF"), "image/png"), "not a png"),
    ("http://127.0.0.1:9/x.png", "private"),
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://[::1]/x.png", "private"),
    ("http://[::ffff:10.0.0.1]/x.png", "private"),
    ("http://10.1.2.3/x.png", "private"),
    ("http://0.0.0.0/x.png", "unspecified"),
    ("http://user:pw@example.com/x.png", "credentials"),
    ("http://[::1/x.png", "not a valid URL"),
    ("http://0177.0.0.1/x.png", "not a valid URL"),
    ("http://\u24dbocal/x.png", "not a valid URL"),
    ("https://xn--/x.png", "not a valid URL"),
    ("http://a\x01b/x.png", "not a valid URL"),
]


@pytest.mark.parametrize(("url", "words"), BAD_IMAGES, ids=[str(i) for i in range(len(BAD_IMAGES))])
def test_bad_images_are_400_naming_the_part(client, url, words):
    body = {"messages": [image_message(url)], "max_tokens": 1}
    error = assert_error(
        client.post("/v1/chat/completions", json=body), 400, "messages[0].content[1].image_url", words
    )
    assert error["code"] == "invalid_image"
    assert client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1}).status_code == 200


def test_too_many_images(make_client):
    client = make_client(max_images_per_request=2)
    url = data_url(image_bytes())
    messages = [image_message(url), image_message(url), image_message(url)]
    assert_error(
        client.post("/v1/chat/completions", json={"messages": messages}), 400, "messages", "at most 2"
    )


def test_tiles_above_the_server_cap(make_client):
    client = make_client(max_tiles_per_image=4)
    body = {"messages": [image_message(data_url(image_bytes()))], "max_tiles_per_image": 5}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "max_tiles_per_image", "at most 4")


def test_too_many_pixels(make_client):
    client = make_client(max_image_pixels=100)
    body = {"messages": [image_message(data_url(image_bytes(size=(11, 10))))]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, words="pixels")


def test_base64_longer_than_the_cap(make_client):
    client = make_client(max_image_bytes=1000)
    body = {"messages": [image_message(data_url(b"\0" * 3000))]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, words="base64")


def test_prompt_longer_than_the_context(client, fake_engine):
    fake_engine.max_model_len = 270
    body = {"messages": [image_message(data_url(image_bytes()))]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "messages", "259 of them for images")


def test_completions_prompt_longer_than_the_context_names_the_prompt(client, fake_engine):
    fake_engine.max_model_len = 100
    error = assert_error(
        client.post("/v1/completions", json={"prompt": [6023] * 120}), 400, "prompt", "120 tokens"
    )
    assert "image" not in error["message"].split(";")[1]  # no advice about images for a text prompt


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_text_too_long_for_the_context_at_any_tokenization_is_400_before_tokenizing(
    client, fake_engine, route
):
    fake_engine.max_model_len = 100  # at most 100 x 128 characters
    calls = []
    real = fake_engine.processor.prepare_chat, fake_engine.processor.chat_token_ids
    fake_engine.processor.prepare_chat = lambda *a, **k: calls.append(1) or real[0](*a, **k)
    fake_engine.processor.chat_token_ids = lambda *a, **k: calls.append(1) or real[1](*a, **k)
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a" * 6000}, {"type": "text", "text": "b" * 6801}],
    }
    assert_error(client.post(route, json={"messages": [parts]}), 400, "messages", "12801 characters")
    assert calls == []
    fits = {"role": "user", "content": "a" * 12800}  # may fit: tokenized, then measured
    assert client.post(route, json={"messages": [fits]}).status_code in (200, 400)
    assert calls == [1]


def test_tokenize_with_no_messages_is_400(client):
    assert_error(client.post("/tokenize", json={"messages": []}), 400, "messages")


def test_invalid_json_is_400(client):
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, None, "JSON")
    assert_error(client.post("/v1/chat/completions"), 400)


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_sent_as_another_content_type_is_told_to_send_json(client, content_type):
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'  # what `curl -d` sends without -H
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert_error(response, 400, None, f"Content-Type: application/json (got '{content_type}')")
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_unknown_model_is_404(client):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": TEXT})
    error = assert_error(response, 404, "model", "gpt-4o")
    assert error["code"] == "model_not_found"


def test_unknown_route_is_404_envelope(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_body_too_large_is_413(make_client):
    client = make_client(max_request_body_bytes=2048)
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(client.post("/v1/chat/completions", json=big), 413, None, "larger than 2048")

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(10):
            yield b"x" * 1000

    assert_error(client.post("/v1/chat/completions", content=chunks()), 413)
    assert client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1}).status_code == 200


def test_overloaded_is_503(client, fake_engine):
    fake_engine.overloaded = True
    calls = len(fake_engine.processor.calls)
    for route, body in (
        ("/v1/chat/completions", {"messages": [image_message(data_url(image_bytes()))]}),
        ("/v1/responses", {"input": "hi"}),
    ):
        response = client.post(route, json=body)
        assert_error(response, 503, None, "overloaded")
        assert response.headers["Retry-After"] == "1"
    assert len(fake_engine.processor.calls) == calls  # refused before any preprocessing
    assert_error(client.post("/v1/chat/completions", json={"messages": TEXT}), 503, None, "overloaded")
    stream = client.post("/v1/chat/completions", json={"messages": TEXT, "stream": True})
    assert_error(stream, 503)
    fake_engine.overloaded = False
    assert client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1}).status_code == 200


def test_bug_is_500_without_internals(client, fake_engine):
    fake_engine.crash_with = RuntimeError("secret /internal/path token=abc")
    response = client.post("/v1/chat/completions", json={"messages": TEXT})
    error = assert_error(response, 500, None)
    assert "secret" not in response.text and "Traceback" not in response.text
    assert error["message"] == "internal server error"
    fake_engine.crash_with = None
    assert client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1}).status_code == 200


def test_a_bug_is_answered_where_it_happens_not_re_raised(fake_engine):
    """Re-raised past the 500, the exception made the server close the connection (a client's next request on it
    was reset); the test client raises what reaches the server."""
    app = create_app(ServerSettings(_env_file=None, served_model_name="fake-model"), fake_engine)
    with TestClient(app, raise_server_exceptions=True) as client:
        fake_engine.crash_with = RuntimeError("a bug")
        assert_error(client.post("/v1/chat/completions", json={"messages": TEXT}), 500)
        fake_engine.crash_with = None
        assert (
            client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1}).status_code == 200
        )


def test_a_route_with_a_trailing_slash_is_a_404_envelope_not_a_bare_redirect(client):
    response = client.post("/v1/chat/completions/", json={"messages": TEXT}, follow_redirects=False)
    assert_error(response, 404)


def test_engine_side_failure(client, fake_engine):
    fake_engine.fail_with = "CUDA error: secret detail"
    response = client.post("/v1/chat/completions", json={"messages": TEXT})
    assert_error(response, 500)
    assert "secret" not in response.text
    stream = client.post("/v1/chat/completions", json={"messages": TEXT, "stream": True})
    assert_error(stream, 500)  # failed before its first token: nothing was streamed yet
    assert "secret" not in stream.text


def test_engine_failure_mid_stream_is_an_error_event(client, fake_engine):
    fake_engine.fail_with, fake_engine.fail_from_step = "CUDA error: secret detail", 2
    stream = client.post("/v1/chat/completions", json={"messages": TEXT, "stream": True, "max_tokens": 8})
    assert stream.status_code == 200
    assert (
        '"error"' in stream.text and "secret" not in stream.text and stream.text.endswith("data: [DONE]\n\n")
    )
    assert '"finish_reason":"stop"' not in stream.text and '"finish_reason":"length"' not in stream.text


DEAD_END = "the JSON schema allows no token after the 3 generated so far"
ROUTES = {
    "/v1/chat/completions": {"messages": TEXT},
    "/v1/completions": {"prompt": "hi"},
    "/v1/responses": {"input": "hi"},
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_failure_of_the_requests_own_making_is_a_400_with_the_engines_reason(client, fake_engine, route):
    fake_engine.fail_with, fake_engine.fail_as_users = DEAD_END, True
    body = {**ROUTES[route], "max_tokens" if route != "/v1/responses" else "max_output_tokens": 8}
    error = assert_error(client.post(route, json=body), 400, None)
    assert error["message"] == DEAD_END and error["type"] == "invalid_request_error"
    # failed before its first token: a plain 400, nothing streamed yet
    error = assert_error(client.post(route, json={**body, "stream": True}), 400, None)
    assert error["message"] == DEAD_END


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_failure_of_the_requests_own_making_mid_stream_is_an_error_event_with_its_reason(
    client, fake_engine, route
):
    fake_engine.fail_with, fake_engine.fail_as_users, fake_engine.fail_from_step = DEAD_END, True, 2
    body = {**ROUTES[route], "max_tokens" if route != "/v1/responses" else "max_output_tokens": 8}
    stream = client.post(route, json={**body, "stream": True})
    assert stream.status_code == 200
    events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    if route == "/v1/responses":
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"] == {"code": "invalid_prompt", "message": DEAD_END}
    else:
        assert events[-1] == {
            "error": {"message": DEAD_END, "type": "invalid_request_error", "param": None, "code": None}
        }
        assert stream.text.endswith("data: [DONE]\n\n")
    # the engine's own failures still say nothing of the inside, mid-stream too
    fake_engine.fail_as_users = False
    stream = client.post(route, json={**body, "stream": True})
    assert stream.status_code == 200 and DEAD_END not in stream.text
    assert "the engine failed while generating this answer" in stream.text


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    ("crash", "status", "code", "words"),
    [
        (EngineDeadError("the loop died"), 503, "engine_dead", "the inference engine is not running"),
        (RuntimeError("secret detail"), 500, None, "the engine failed while generating this answer"),
    ],
)
def test_a_stream_cut_by_the_engine_ends_with_an_error_event(
    client, fake_engine, route, crash, status, code, words
):
    fake_engine.crash_mid_stream, fake_engine.fail_from_step = crash, 2
    body = {**ROUTES[route], "max_tokens" if route != "/v1/responses" else "max_output_tokens": 8}
    stream = client.post(route, json={**body, "stream": True})
    assert stream.status_code == 200 and "secret" not in stream.text
    events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    if route == "/v1/responses":
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"] == {"code": "server_error", "message": words}
    else:
        kind = "service_unavailable_error" if status == 503 else "internal_server_error"
        assert events[-1] == {"error": {"message": words, "type": kind, "param": None, "code": code}}
        assert stream.text.endswith("data: [DONE]\n\n")


def test_dead_engine(client, fake_engine):
    fake_engine.dead = True
    assert_error(client.get("/health"), 503)
    assert_error(client.post("/v1/chat/completions", json={"messages": TEXT}), 503)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_temperature_follows_openai_range(client, fake_engine, route):
    """OpenAI's temperature is 0..2: above is a 400 naming it; 2 itself reaches the engine."""
    body = {"messages": TEXT} if route == "/v1/chat/completions" else {"prompt": "hi"}
    for value in (2.01, 5):
        error = assert_error(
            client.post(route, json={**body, "max_tokens": 1, "temperature": value}), 400, "temperature", "2"
        )
        assert error["type"] == "invalid_request_error"
    assert client.post(route, json={**body, "max_tokens": 1, "temperature": 2}).status_code == 200
    _, params = list(fake_engine.requests.values())[-1]
    assert params.temperature == 2.0


def with_image_processor(fake_engine, **kwargs):
    """The fake processor with a real image processor, whose default tile count the server reads."""
    from ovis2 import Ovis2ImageProcessor

    fake_engine.processor.image_processor = Ovis2ImageProcessor(**kwargs)
    return fake_engine


@pytest.mark.parametrize(("compat", "cap"), [("ovis", 9), ("transformers", 12)])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_tiles_above_the_compat_default_when_the_flag_is_unset(make_client, fake_engine, compat, cap, route):
    """No --max-tiles-per-image: the cap is the compat's default; a request may lower it, never raise it."""
    client = make_client(with_image_processor(fake_engine, compat=compat))
    messages = [image_message(data_url(image_bytes(size=(3000, 3000))))]
    extra = {"max_tokens": 1} if route == "/v1/chat/completions" else {}
    for tiles in (cap + 1, 16, 64, 100):
        body = {"messages": messages, "max_tiles_per_image": tiles, **extra}
        assert_error(client.post(route, json=body), 400, "max_tiles_per_image", f"at most {cap}")
    assert fake_engine.processor.calls == []  # refused before any image was processed
    for tiles in (cap, 2):
        body = {"messages": messages, "max_tiles_per_image": tiles, **extra}
        assert client.post(route, json=body).status_code == 200, client.post(route, json=body).text
        assert fake_engine.processor.calls[-1][1] == tiles


def test_tile_cap_follows_the_checkpoint_and_the_flag(make_client, fake_engine):
    from server.chat_inputs import max_tiles
    from server.errors import APIError

    client = make_client(with_image_processor(fake_engine, compat="transformers", config_max_patches=6))
    state = client.app.state.server
    assert max_tiles(state, None) is None and state.max_tiles_per_image == 6  # None: the processor's default
    assert max_tiles(state, 3) == 3
    with pytest.raises(APIError, match="at most 6"):
        max_tiles(state, 7)
    flagged = make_client(
        with_image_processor(fake_engine, compat="ovis"), max_tiles_per_image=16
    ).app.state.server
    assert max_tiles(flagged, None) == 16 and max_tiles(flagged, 16) == 16  # the operator may raise it


MALFORMED_PARTS = [
    # (content part, param, words the message must hold)
    (
        {"type": "image_url", "image_url": "https://example.com/a.png"},
        "messages[0].content[0].image_url",
        '{"url": ',
    ),
    (
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "ultra"}},
        "messages[0].content[0].image_url.detail",
        "'auto', 'low' or 'high'",
    ),
    (
        {"type": "image_url", "image_url": {"detail": "low"}},
        "messages[0].content[0].image_url.url",
        "required",
    ),
    ({"type": "image", "image": "https://example.com/a.png"}, "messages[0].content[0].type", "'image_url'"),
    ({"type": "text"}, "messages[0].content[0].text", "required"),
    ({"type": "text", "text": 5}, "messages[0].content[0].text", "valid string"),
    ({"type": "image_url", "image_url": 5}, "messages[0].content[0].image_url", "JSON object"),
    ({"text": "hi"}, "messages[0].content[0].type", "required"),
    ({"type": ["text"], "text": "hi"}, "messages[0].content[0].type", "valid string"),
    ("hi", "messages[0].content[0]", "object"),
]


@pytest.mark.parametrize(
    ("part", "param", "words"), MALFORMED_PARTS, ids=[str(i) for i in range(len(MALFORMED_PARTS))]
)
def test_malformed_content_parts_name_the_part_and_field(client, part, param, words):
    """The error is the one of the part's own type: not 'content: Input should be a valid string (and 1 more)'."""
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, param, words)
    assert error["message"].startswith(param + ": "), error
    assert "more problem" not in error["message"], error
    assert "ImageURL" not in error["message"] and "Part" not in error["message"], error


@pytest.mark.parametrize(
    ("content", "words"), [(5, "string or a list"), ({"type": "text", "text": "hi"}, "list")]
)
def test_content_that_is_neither_text_nor_parts(client, content, words):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "messages[0].content", words)
    assert "more problem" not in error["message"], error


def test_plain_string_content_and_parts_still_work(client, fake_engine):
    url = data_url(image_bytes())
    for content in (
        "hi",
        [{"type": "text", "text": "hi"}],
        [{"type": "image_url", "image_url": {"url": url}}],
    ):
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": True, "stream_options": "yes"}, "stream_options"),
        ({"response_format": "json"}, "response_format"),
        ({"messages": ["hi"]}, "messages[0]"),
    ],
)
def test_a_value_that_should_be_an_object_says_so_without_class_names(client, fields, param):
    error = assert_error(
        client.post("/v1/chat/completions", json={"messages": TEXT, **fields}),
        400,
        param,
        "should be a JSON object",
    )
    assert "instance of" not in error["message"], error
