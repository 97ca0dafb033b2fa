"""Hostile but well-formed requests: nothing a client sends may stall the event loop that serves everyone."""

from __future__ import annotations

import asyncio

PROMPT = "tokenize me off the event loop"


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_text_is_tokenized_off_the_event_loop(client, tokenizer, monkeypatch):
    """A 32 MB prompt keeps the tokenizer busy for 20 s or more; on the event loop that stalls every other request."""
    calls = []
    for name in ("encode", "decode", "convert_ids_to_tokens"):

        def spy(arg, *args, _original=getattr(tokenizer, name), _name=name, **kwargs):
            if _name != "encode" or arg == PROMPT:  # the fake engine encodes its own words
                calls.append((_name, _on_event_loop()))
            return _original(arg, *args, **kwargs)

        monkeypatch.setattr(tokenizer, name, spy)
    ids = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).status_code == 200
    for prompt in (PROMPT, ids):  # echo decodes token ids (a text prompt is echoed as sent)
        response = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "max_tokens": 1})
        assert response.status_code == 200
    assert sorted(calls) == [
        ("convert_ids_to_tokens", False),
        ("decode", False),
        ("decode", False),
        ("encode", False),
        ("encode", False),
    ]


def test_long_stop_strings_are_refused(client):
    """The engine scans each stop string on every token at a cost that grows with the square of its length: 16
    stops of 20k characters (a 320 KB body) cost 13 ms per token per sequence, stalling every batch."""
    for route, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ]:
        for stop in ("x" * 257, ["ok", "x" * 20_000]):
            response = client.post(route, json={**body, "stop": stop, "max_tokens": 1})
            assert response.status_code == 400 and response.json()["error"]["param"] == "stop", response.text
        assert client.post(route, json={**body, "stop": ["x" * 256] * 16, "max_tokens": 1}).status_code == 200


def test_logit_bias_has_openais_cap_of_300_tokens(client):
    """The engine rebuilds each request's bias tensors from its dict on every step: a bias on the whole vocabulary
    (a 2 MB body) with n=16 cost 455 ms per step, for every request in the batch."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = client.post(
        "/v1/chat/completions", json={**body, "logit_bias": {str(t): -1 for t in range(301)}}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias", response.text
    response = client.post(
        "/v1/completions", json={"prompt": "hi", "logit_bias": {str(t): -1 for t in range(301)}}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias", response.text
    assert client.post(
        "/v1/chat/completions", json={**body, "logit_bias": {str(t): -1 for t in range(300)}}
    ).is_success
