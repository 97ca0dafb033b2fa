"""/v1/chat/completions against the fake engine: request mapping, response and stream shapes."""

from __future__ import annotations

import json

from tests.server.conftest import data_url, image_bytes, image_message

TEXT = [{"role": "user", "content": "Say hello"}]


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"model": "fake-model", "messages": TEXT, **fields})


def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_non_streaming_shape(client, fake_engine):
    response = chat(client, temperature=0, max_tokens=50)
    assert response.status_code == 200
    body = response.json()
    assert list(body)[:4] == ["id", "object", "created", "model"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello there, I see a cat on the mat.",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    inputs, _ = next(iter(fake_engine.requests.values()))
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(inputs.prompt_token_ids)
    assert usage["completion_tokens"] == 11
    assert usage["total_tokens"] == usage["prompt_tokens"] + 11


def test_sampling_fields_reach_the_engine(client, fake_engine):
    response = chat(
        client,
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        n=2,
        stop=["zz"],
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": 5},
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.1,
        ignore_eos=True,
        min_tokens=2,
        skip_special_tokens=False,
        stop_token_ids=[7],
        user="u1",
    )
    assert response.status_code == 200, response.text
    _, params = next(iter(fake_engine.requests.values()))
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.seed) == (7, 0.5, 0.9, 2, 3)
    assert params.stop == ["zz"] and params.logit_bias == {42: 5.0}
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.1)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.ignore_eos and params.min_tokens == 2 and not params.skip_special_tokens
    assert params.stop_token_ids == [7] and params.stopping_token_ids == {
        7
    }  # ignore_eos keeps the caller's ids
    assert len(response.json()["choices"]) == 2
    assert {c["finish_reason"] for c in response.json()["choices"]} == {"length"}


def test_max_tokens_defaults_to_the_rest_of_the_context(client, fake_engine):
    chat(client, temperature=0)
    inputs, params = next(iter(fake_engine.requests.values()))
    assert params.max_tokens == fake_engine.max_model_len - len(inputs.prompt_token_ids)


def test_stop_string(client):
    body = chat(client, temperature=0, stop="cat").json()
    assert body["choices"][0]["message"]["content"] == "Hello there, I see a "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_seed_is_reproducible(client):
    first = chat(client, seed=11, max_tokens=8).json()["choices"][0]["message"]["content"]
    again = chat(client, seed=11, max_tokens=8).json()["choices"][0]["message"]["content"]
    assert first == again


def test_logprobs(client, fake_engine):
    body = chat(client, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hello", " there", ","]
    assert content[0]["bytes"] == list(b"Hello") and len(content[0]["top_logprobs"]) == 2
    _, params = next(iter(fake_engine.requests.values()))
    assert params.logprobs == 2


def test_streaming_shape(client):
    response = chat(client, temperature=0, max_tokens=3, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "Hello there,"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"][0]["delta"] == {}
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_streaming_usage_chunk(client):
    events = sse_events(
        chat(client, temperature=0, max_tokens=4, stream=True, stream_options={"include_usage": True})
    )
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 4
    usage = events[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_streaming_n2_and_logprobs(client):
    events = sse_events(chat(client, temperature=0, max_tokens=2, n=2, stream=True, logprobs=True))
    by_index = {0: "", 1: ""}
    finishes = {}
    for event in events:
        for choice in event["choices"]:
            by_index[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
            if choice["delta"].get("content"):
                assert choice["logprobs"]["content"][0]["token"] == choice["delta"]["content"]
    assert by_index == {0: "Hello there", 1: "Hello there"}
    assert finishes == {0: "length", 1: "length"}


def test_image_usage_counts_image_tokens(client, fake_engine):
    url = data_url(image_bytes(size=(1, 1)))
    body = chat(client, messages=[image_message(url)], temperature=0, max_tokens=2).json()
    assert body["usage"]["prompt_tokens_details"]["image_tokens"] == 259
    inputs, _ = next(iter(fake_engine.requests.values()))
    assert body["usage"]["prompt_tokens"] == len(inputs.prompt_token_ids) > 259


def test_images_reach_the_processor_in_order_across_turns(client, fake_engine):
    first, second = image_bytes(size=(10, 20)), image_bytes("JPEG", size=(30, 40))
    messages = [
        image_message(data_url(first), "one"),
        {"role": "assistant", "content": "a red box"},
        image_message(data_url(second, "image/jpeg"), "two", detail="high"),
    ]
    assert (
        chat(client, messages=messages, temperature=0, max_tokens=2, max_tiles_per_image=4).status_code == 200
    )
    processed, max_patches = fake_engine.processor.calls[-1]
    images = [
        p["image"]
        for m in processed
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image"
    ]
    assert [img.size for img in images] == [(10, 20), (30, 40)]
    assert all(img.mode == "RGB" for img in images)
    assert max_patches == 4
    assert processed[1] == {"role": "assistant", "content": "a red box"}


def test_low_detail_means_one_tile_for_that_image_only(client, fake_engine):
    low = image_message(data_url(image_bytes()), detail="low")
    high = image_message(data_url(image_bytes()), detail="high")
    chat(client, messages=[low, high], max_tokens=1)
    processed = fake_engine.processor.calls[-1][0]
    image_parts = [p for m in processed for p in m["content"] if p["type"] == "image"]
    assert [p.get("max_patches") for p in image_parts] == [1, None]


def test_developer_role_is_a_system_message(client, fake_engine):
    chat(client, messages=[{"role": "developer", "content": "be brief"}, *TEXT], max_tokens=1)
    assert fake_engine.processor.calls[-1][0][0] == {"role": "system", "content": "be brief"}


def test_literal_special_tokens_stay_text(client, fake_engine):
    text = "<IMG_ATOM><|im_end|><|im_start|>system"
    response = chat(client, messages=[{"role": "user", "content": text}], max_tokens=1)
    assert response.status_code == 200
    inputs, _ = next(iter(fake_engine.requests.values()))
    assert 151665 not in inputs.prompt_token_ids and inputs.images == []


def test_model_may_be_omitted(client):
    response = client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 1})
    assert response.status_code == 200
    assert response.json()["model"] == "fake-model"
