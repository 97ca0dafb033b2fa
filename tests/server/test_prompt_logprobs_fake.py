"""/v1/completions with echo and logprobs (the prompt's own logprobs first) and echo with max_tokens 0, against
the fake engine, whose prompt logprobs are scripted: token p has -p / 10, its top k are t0, t1, ... at -2, -3, ..."""

from __future__ import annotations

import json
import threading

import pytest

PROMPT = "Say hi to the cat"


def prompt_tokens(client, prompt: str) -> list[str]:
    ids = client.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    return [client.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in ids]


def streamed(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def joined(chunks: list[dict], index: int = 0) -> dict:
    """One choice's streamed text and logprobs, put together."""
    text, logprobs = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] == index:
                text += choice["text"]
                for key in logprobs:
                    logprobs[key] += (choice["logprobs"] or {}).get(key, [])
    return {"text": text, "logprobs": logprobs}


def check_prompt_part(logprobs: dict, tokens: list[str], k: int) -> None:
    n = len(tokens)
    assert logprobs["tokens"][:n] == tokens
    assert logprobs["token_logprobs"][:n] == [None] + [-p / 10 for p in range(1, n)]
    assert logprobs["top_logprobs"][0] is None
    for p in range(1, n):
        assert logprobs["top_logprobs"][p] == {tokens[p]: -p / 10, **{f"t{i}": -2.0 - i for i in range(k)}}
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0
    assert offsets[1:] == [offsets[i] + len(logprobs["tokens"][i]) for i in range(len(offsets) - 1)]


def test_echo_with_logprobs_puts_the_prompts_logprobs_first(client, fake_engine):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 2, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    choice, tokens = whole["choices"][0], prompt_tokens(client, PROMPT)
    assert choice["text"] == PROMPT + "Hello there" and "".join(tokens) == PROMPT
    check_prompt_part(choice["logprobs"], tokens, 2)
    assert choice["logprobs"]["tokens"][len(tokens) :] == ["Hello", " there"]
    assert choice["logprobs"]["token_logprobs"][len(tokens) :] == [-0.25, -0.25]
    _, params = next(iter(fake_engine.requests.values()))
    assert params.prompt_logprobs == 2 and params.logprobs == 2
    assert whole["usage"]["completion_tokens"] == 2
    assert joined(streamed(client, body)) == {"text": choice["text"], "logprobs": choice["logprobs"]}


def test_no_prompt_logprobs_without_echo_or_without_logprobs(client, fake_engine):
    for fields in ({"logprobs": 1}, {"echo": True}):
        client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, **fields})
    assert [params.prompt_logprobs for _, params in fake_engine.requests.values()] == [None, None]


@pytest.mark.parametrize("logprobs", [None, 0])
def test_echo_with_no_tokens_answers_the_prompt_alone(client, fake_engine, logprobs):
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": logprobs}
    whole = client.post("/v1/completions", json=body).json()
    choice, tokens = whole["choices"][0], prompt_tokens(client, PROMPT)
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    usage = whole["usage"]
    assert (usage["completion_tokens"], usage["total_tokens"]) == (0, usage["prompt_tokens"])
    if logprobs is None:
        assert choice["logprobs"] is None
    else:
        assert len(choice["logprobs"]["tokens"]) == len(tokens)
        check_prompt_part(choice["logprobs"], tokens, 0)
    _, params = next(iter(fake_engine.requests.values()))
    assert params.max_tokens == 1  # one token runs, and is left out
    chunks = streamed(client, {**body, "stream_options": {"include_usage": True}})
    assert joined(chunks)["text"] == PROMPT
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 0


def test_the_one_token_run_for_no_tokens_is_free_of_the_constraint(client, fake_engine):
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 0, "structured_outputs": {"regex": "[0-9]"}}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == PROMPT
    client.post("/v1/completions", json={**body, "max_tokens": 1})
    assert [params.structured_outputs for _, params in fake_engine.requests.values()][0] is None
    assert [params.structured_outputs for _, params in fake_engine.requests.values()][1].regex == "[0-9]"


def test_no_tokens_without_echo_is_refused(client):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("late", [None, "-1"])
def test_each_prompt_gives_its_own_choices_its_logprobs(client, fake_engine, late):
    """`late`: the second prompt's first output comes after the first prompt's answer has begun streaming."""
    fake_engine.late_suffix, fake_engine.late_delay = late, 0.3
    prompts = ["Once upon", "Twice"]
    body = {"prompt": prompts, "n": 2, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    chunks = streamed(client, body)
    for choice in whole["choices"]:
        tokens = prompt_tokens(client, prompts[choice["index"] // 2])
        assert choice["text"] == prompts[choice["index"] // 2] + "Hello"
        check_prompt_part(choice["logprobs"], tokens, 1)
        assert choice["logprobs"]["tokens"][len(tokens) :] == ["Hello"]
        assert joined(chunks, choice["index"]) == {"text": choice["text"], "logprobs": choice["logprobs"]}


def test_echoed_logprobs_are_capped(client, monkeypatch):
    from server import prompt_logprobs

    tokens = len(prompt_tokens(client, PROMPT))
    monkeypatch.setattr(
        prompt_logprobs, "MAX_PROMPT_LOGPROB_VALUES", 2 * tokens * 2 * 2
    )  # 2 prompts x n 2 x (1 + 1)
    body = {"prompt": [PROMPT, PROMPT], "echo": True, "n": 2, "logprobs": 1, "max_tokens": 0}
    assert client.post("/v1/completions", json=body).status_code == 200
    for more in ({"logprobs": 2}, {"n": 3}, {"prompt": [PROMPT] * 3}):
        response = client.post("/v1/completions", json={**body, **more})
        assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs", response.text
        assert "prompt tokens x (k + 1)" in response.json()["error"]["message"]
    assert client.post("/v1/completions", json={**body, "echo": False, "max_tokens": 1}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi " * 100}], "prompt_logprobs": 1, "max_tokens": 1}
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs", (
        response.text
    )


def check_vllm_field(field: list, ids: list[int], texts: list[str], k: int) -> None:
    """vLLM's prompt_logprobs: None first, then {token id: {logprob, rank, decoded_token}}: the token and its top k."""
    assert len(field) == len(ids) and field[0] is None
    for p in range(1, len(ids)):
        top = {str(100 + i): {"logprob": -2.0 - i, "rank": i + 1, "decoded_token": f"t{i}"} for i in range(k)}
        own = {str(ids[p]): {"logprob": -p / 10, "rank": k + p, "decoded_token": texts[p]}}
        assert field[p] == {**top, **own}


def test_vllms_prompt_logprobs_field_on_completions_and_chat(client, fake_engine):
    ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    body = {"prompt": [PROMPT, PROMPT], "n": 2, "prompt_logprobs": 2, "max_tokens": 1}
    whole = client.post("/v1/completions", json=body).json()
    for choice in whole["choices"]:
        check_vllm_field(choice["prompt_logprobs"], ids, prompt_tokens(client, PROMPT), 2)
        assert choice["logprobs"] is None
    assert (
        client.post("/v1/completions", json={"prompt": PROMPT}).json()["choices"][0]["prompt_logprobs"]
        is None
    )

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "prompt_logprobs": 0}).json()
    inputs, params = list(fake_engine.requests.values())[-1]
    texts = [
        client.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in inputs.prompt_token_ids
    ]
    check_vllm_field(chat["prompt_logprobs"], inputs.prompt_token_ids, texts, 0)
    assert params.prompt_logprobs == 0 and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_vllms_prompt_logprobs_are_refused_when_streaming_or_out_of_range(client, route):
    body = (
        {"prompt": PROMPT} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    )
    for fields in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
        response = client.post(route, json={**body, "max_tokens": 1, **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs", (
            response.text
        )


def test_whole_answers_are_built_in_threads_of_their_own(client, monkeypatch):
    """Not on the event loop (a large one held every other request), nor in the pool that decodes media."""
    from server.completion_builder import CompletionBuilder

    names, original = [], CompletionBuilder.response

    def recording(self, final):
        names.append(threading.current_thread().name)
        return original(self, final)

    monkeypatch.setattr(CompletionBuilder, "response", recording)
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 200
    assert len(names) == 1 and names[0].startswith("ovis2-answer"), names


def test_a_streamed_choices_first_chunk_with_prompt_logprobs_is_built_off_the_event_loop(client, monkeypatch):
    """It lists up to 2^18 prompt logprob values; the chunks after it stay on the loop."""
    from server.completion_builder import CompletionBuilder

    calls, original = [], CompletionBuilder.delta_chunk

    def recording(self, output, first, include_usage):
        calls.append((first, threading.current_thread().name))
        return original(self, output, first, include_usage)

    monkeypatch.setattr(CompletionBuilder, "delta_chunk", recording)
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0}
    assert joined(streamed(client, body))["text"] == PROMPT + "Hello there"
    first_calls = [name for first, name in calls if first]
    assert first_calls and all(name.startswith("ovis2-answer") for name in first_calls), calls
    assert any(not first and not name.startswith("ovis2-answer") for first, name in calls), calls
