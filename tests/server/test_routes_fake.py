"""Auth, CORS, models, health, metrics, tokenize/detokenize and /v1/completions against the fake engine."""

from __future__ import annotations

import json

from tests.server.conftest import data_url, image_bytes, image_message

TEXT = [{"role": "user", "content": "hi"}]


def test_api_key_guards_inference_routes(make_client):
    client = make_client(api_key="s3cret")
    body = {"messages": TEXT, "max_tokens": 1}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "Bearer s3cret2"},
        {"Authorization": "Bearer"},
    ):
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/chat/completions", json=body, headers=good).status_code == 200
    assert client.get("/v1/models", headers=good).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_auth_is_checked_before_the_body(make_client):
    client = make_client(api_key="k")
    assert client.post("/v1/chat/completions", content=b"{bad json").status_code == 401


def test_cors(make_client):
    client = make_client(cors_origins=["https://app.example.com"])
    preflight = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_by_default(client):
    response = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in response.headers


def test_models(client, fake_engine):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "fake-model" and body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == fake_engine.max_model_len
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert client.get("/v1/models/other").status_code == 404


def test_health(client, fake_engine):
    assert client.get("/health").status_code == 200 and client.head("/health").status_code == 200
    fake_engine.dead = True
    assert client.get("/health").status_code == 503 and client.head("/health").status_code == 503


def test_lifespan_starts_and_stops_the_engine(make_client, fake_engine):
    client = make_client()
    assert fake_engine.started and not fake_engine.stopped
    client.__exit__(None, None, None)
    assert fake_engine.stopped


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics(client, fake_engine):
    url = data_url(image_bytes())
    client.post("/v1/chat/completions", json={"messages": [image_message(url)], "max_tokens": 3})
    client.post("/v1/chat/completions", json={"messages": TEXT, "temperature": 0})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "ovis2_requests_total", finished_reason="length") == 1
    assert metric(text, "ovis2_requests_total", finished_reason="stop") == 1
    assert metric(text, "ovis2_generation_tokens_total") == 3 + 11
    assert metric(text, "ovis2_image_tokens_total") == 259
    assert metric(text, "ovis2_images_total") == 1
    assert metric(text, "ovis2_prompt_tokens_total") > 259
    assert metric(text, "ovis2_num_preemptions_total") == 0
    fake_engine.preemptions = 3
    assert metric(client.get("/metrics").text, "ovis2_num_preemptions_total") == 3
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_preprocess_seconds",
    ):
        assert metric(text, f"ovis2_{histogram}_count") == 2
    assert metric(text, "ovis2_inter_token_latency_seconds_count") == 2 + 10
    for gauge in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_ratio",
        "kv_cache_free_blocks",
    ):
        metric(text, f"ovis2_{gauge}")
    assert "ovis2_request_queue_time_seconds" in text


def test_tokenize_text_and_detokenize(client, tokenizer):
    body = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["token_strs"] == ["Hello", "Ġworld"] and body["max_model_len"] == 4096
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    assert client.post("/detokenize", json={"tokens": [-5]}).status_code == 400


def test_tokenize_messages_counts_image_tokens(client, fake_engine):
    messages = [image_message(data_url(image_bytes()))]
    body = client.post("/tokenize", json={"messages": messages}).json()
    assert body["image_tokens"] == 259 and body["count"] > 259
    assert client.post("/tokenize", json={"messages": messages, "prompt": "x"}).status_code == 400


def test_completions(client, fake_engine):
    body = client.post(
        "/v1/completions",
        json={"model": "fake-model", "prompt": "Once", "temperature": 0, "max_tokens": 3, "logprobs": 1},
    ).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == "Hello there," and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["Hello", " there", ","]
    assert choice["logprobs"]["text_offset"] == [0, 5, 11]
    assert choice["logprobs"]["top_logprobs"][0] == {"Hello": -0.25}
    assert body["usage"]["completion_tokens"] == 3
    # logprobs 0: no top tokens, but the sampled one is always listed (the legacy API's rule)
    body = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2, "logprobs": 0}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 2
    assert logprobs["top_logprobs"] == [
        {t: lp} for t, lp in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    ]
    inputs, params = next(iter(fake_engine.requests.values()))
    assert inputs.images == [] and params.max_tokens == 3 and params.logprobs == 1


def test_completions_defaults_to_16_tokens_and_echo(client, fake_engine):
    fake_engine.words = ["a"] * 40
    body = client.post("/v1/completions", json={"prompt": "Say", "echo": True, "temperature": 0}).json()
    assert body["choices"][0]["text"] == "Say" + "a" * 16


def test_completions_stream(client):
    response = client.post(
        "/v1/completions",
        json={
            "prompt": "x",
            "stream": True,
            "max_tokens": 2,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        },
    )
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello there"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_several_prompts_answer_as_one_request_numbered_prompt_major(client, fake_engine):
    prompts = ["Once", "Twice"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "echo": True}
    whole = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in whole["choices"]] == [prompts[i // 2] + "Hello there," for i in range(4)]
    prompt_tokens = sum(client.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts)
    usage = whole["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, 12)
    assert len(fake_engine.finished) == 2 and not fake_engine.running  # two engine requests

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=stream) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    texts, finishes = ["", "", "", ""], [[], [], [], []]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            finishes[choice["index"]] += [choice["finish_reason"]] if choice["finish_reason"] else []
    assert texts == [c["text"] for c in whole["choices"]] and finishes == [["length"]] * 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens


def test_several_prompts_fail_together_and_are_capped(client, fake_engine):
    response = client.post("/v1/completions", json={"prompt": ["x"] * 17})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    response = client.post("/v1/completions", json={"prompt": [[9707], [151665]]})
    assert response.json()["error"]["param"] == "prompt[1]" and "image tokens" in response.text
    fake_engine.fail_with = "injected"
    response = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 3})
    assert response.status_code == 500 and "injected" not in response.text
    assert not fake_engine.running


def test_no_more_prompts_than_the_engine_queues(make_client):
    client = make_client(max_waiting_requests=2)
    assert client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200
    response = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
    assert response.status_code == 400 and "at most 2" in response.json()["error"]["message"], response.text


def test_completions_token_ids_and_bad_prompts(client):
    assert client.post("/v1/completions", json={"prompt": [9707, 1879], "max_tokens": 1}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": [[9707]], "max_tokens": 1}).status_code == 200
    for prompt, words in [
        ("a <IMG_ATOM> b", "image tokens"),
        ([151665], "image tokens"),
        ([10**9], "outside"),
        ("", "empty"),
    ]:
        response = client.post("/v1/completions", json={"prompt": prompt})
        assert response.status_code == 400 and words in response.json()["error"]["message"], response.text
        assert response.json()["error"]["param"] == "prompt"
    for fields, param in [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"max_tokens": 5000}, "max_tokens"),
    ]:
        response = client.post("/v1/completions", json={"prompt": "x", **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_echo_with_no_tokens_counts_no_generated_tokens(client):
    """The one token run for `echo` with `max_tokens: 0` is not the answer's: no tokens, no token latencies."""
    client.post("/v1/completions", json={"prompt": "Say hi", "max_tokens": 2})  # every metric has a sample
    before = client.get("/metrics").text
    body = {"prompt": "Say hi", "echo": True, "max_tokens": 0, "n": 3}
    assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 0
    after = client.get("/metrics").text
    for name in ("ovis2_generation_tokens_total", "ovis2_time_to_first_token_seconds_count"):
        assert metric(after, name) == metric(before, name), name
    length = metric(after, "ovis2_requests_total", finished_reason="length")
    assert length == metric(before, "ovis2_requests_total", finished_reason="length") + 3
