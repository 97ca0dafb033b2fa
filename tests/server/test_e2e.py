"""End to end: the real server in a subprocess (tiny demo checkpoint, compat transformers), driven by the official
`openai` client and raw HTTP. One server for the whole session; the SIGTERM test stops it, so it runs last."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from tests.server.conftest import data_url, image_bytes, image_message
from tests.server.test_errors import BAD_CHAT_FIELDS, BAD_IMAGES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def image_url() -> str:
    return data_url(image_bytes(size=(600, 900), color=(120, 30, 200)))


def chat_messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}],
        }
    ]


def metrics(live_server) -> dict[str, float]:
    return live_server.metrics()


def test_sync_client_with_a_data_url_image(client, live_server, image_url):
    response = client.chat.completions.create(
        model=live_server.model, messages=chat_messages(image_url), max_tokens=6, temperature=0
    )
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == live_server.model
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    counted = httpx.post(
        live_server.base_url + "/tokenize", json={"messages": chat_messages(image_url)}
    ).json()
    usage = response.usage
    assert usage.prompt_tokens == counted["count"] and counted["image_tokens"] > 0
    assert usage.prompt_tokens > counted["image_tokens"]
    assert usage.completion_tokens == (6 if choice.finish_reason == "length" else usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_async_client_streaming_an_http_image(live_server, image_server):
    async def run():
        client = AsyncOpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=live_server.model,
            messages=chat_messages(image_server.url("/img.png")),
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5
    assert chunks[-1].usage.prompt_tokens > 259


def test_sync_streaming_and_async_non_streaming_agree(client, live_server, image_url):
    stream = client.chat.completions.create(
        model=live_server.model, messages=chat_messages(image_url), max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    async def run():
        async with AsyncOpenAI(base_url=live_server.base_url + "/v1", api_key="unused") as aclient:
            response = await aclient.chat.completions.create(
                model=live_server.model, max_tokens=6, temperature=0, messages=chat_messages(image_url)
            )
            return response.choices[0].message.content

    assert asyncio.run(run()) == streamed


def test_a_slow_image_server_does_not_stall_other_requests(client, live_server, image_server):
    slow = {}

    def slow_request():
        start = time.monotonic()
        client.chat.completions.create(
            model=live_server.model, max_tokens=2, messages=chat_messages(image_server.url("/slow?s=3&stall"))
        )
        slow["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    client.chat.completions.create(
        model=live_server.model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    fast_seconds = time.monotonic() - start
    thread.join(30)
    assert fast_seconds < 1.5 and slow["seconds"] >= 3


def test_raw_sse_ends_with_done(live_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", live_server.base_url + "/v1/chat/completions", json=body, timeout=60
    ) as response:
        raw = "".join(response.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n2(client, live_server):
    response = client.chat.completions.create(
        model=live_server.model,
        n=2,
        max_tokens=8,
        temperature=1.0,
        seed=5,
        messages=[{"role": "user", "content": "Tell me a story"}],
    )
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert all(c.message.content for c in response.choices)
    assert 2 <= response.usage.completion_tokens <= 16


def test_stop(client, live_server):
    messages = [{"role": "user", "content": "Count to ten"}]
    full = (
        client.chat.completions.create(
            model=live_server.model, messages=messages, max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    cut = client.chat.completions.create(
        model=live_server.model, messages=messages, max_tokens=12, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]


def test_seed_is_reproducible(client, live_server):
    def sample() -> str:
        return (
            client.chat.completions.create(
                model=live_server.model,
                max_tokens=10,
                temperature=1.0,
                seed=1234,
                messages=[{"role": "user", "content": "Say something"}],
            )
            .choices[0]
            .message.content
        )

    assert sample() == sample()


def test_logprobs(client, live_server):
    response = client.chat.completions.create(
        model=live_server.model,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        messages=[{"role": "user", "content": "Hi"}],
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert (
            tops == sorted(tops, reverse=True) and entry.logprob == tops[0]
        )  # the same float: greedy picks the top


def test_completions_endpoint(client, live_server):
    response = client.completions.create(
        model=live_server.model, prompt="Once upon a time", max_tokens=4, temperature=0
    )
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage.completion_tokens <= 4
    prompts = ["Once upon a time", [9707, 1879, 374]]
    alone = [
        client.completions.create(model=live_server.model, prompt=p, max_tokens=4, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    together = client.completions.create(
        model=live_server.model, prompt=[prompts[0], "x"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in together.choices] == [0, 1, 2, 3] and together.choices[1].text == alone[0]
    ids = client.completions.create(
        model=live_server.model, prompt=[[1], prompts[1]], max_tokens=4, temperature=0
    )
    assert ids.choices[1].text == alone[1] and ids.usage.prompt_tokens == 4
    prompt = "e\u0301 caf\u00e9"  # the tokenizer normalizes it to NFC: echo gives back what was sent
    for sent in (prompt, [prompt]):
        echoed = client.completions.create(model=live_server.model, prompt=sent, max_tokens=1, echo=True)
        assert echoed.choices[0].text.startswith(prompt), echoed.choices[0].text


def test_echoed_prompt_logprobs_equal_what_generation_reports_at_each_position(client, live_server):
    """lm-eval-harness's loglikelihood request (echo, logprobs, max_tokens 0): prompt token p's entry holds the
    distribution a greedy request for prompt[:p] samples from."""
    prompt = [9707, 1879, 374, 264, 1273, 13]
    scored = client.completions.create(
        model=live_server.model, prompt=prompt, echo=True, logprobs=5, max_tokens=0, temperature=0
    )
    choice = scored.choices[0]
    assert choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt) and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(1, len(prompt)):
        generated = client.completions.create(
            model=live_server.model, prompt=prompt[:p], max_tokens=1, logprobs=5, temperature=0
        )
        expected, found = generated.choices[0].logprobs.top_logprobs[0], logprobs.top_logprobs[p]
        scale = max(abs(v) for v in expected.values())
        assert set(found) - set(expected) <= {logprobs.tokens[p]}
        assert {key: found[key] for key in expected} == pytest.approx(expected, rel=1e-4, abs=1e-5 * scale)
        assert logprobs.token_logprobs[p] == found[logprobs.tokens[p]] <= 0


def test_a_chat_with_an_image_scores_its_prompt(client, live_server, image_url):
    """vLLM's `prompt_logprobs` on chat: the prompt scored token by token, the image placeholders None, each entry
    the token itself and the top 3 ranked by logprob."""
    from ovis2.image_layout import IMAGE_TOKEN_IDS

    response = client.chat.completions.create(
        model=live_server.model,
        messages=chat_messages(image_url),
        max_tokens=1,
        temperature=0,
        extra_body={"prompt_logprobs": 3},
    )
    ids = httpx.post(live_server.base_url + "/tokenize", json={"messages": chat_messages(image_url)}).json()[
        "tokens"
    ]
    field = response.model_extra["prompt_logprobs"]
    assert len(field) == len(ids) == response.usage.prompt_tokens and field[0] is None
    for token_id, entry in zip(ids[1:], field[1:], strict=True):
        if token_id in IMAGE_TOKEN_IDS:
            assert entry is None
            continue
        own = entry[str(token_id)]
        assert own["logprob"] <= 0 and own["rank"] >= 1 and 3 <= len(entry) <= 4
        ranked = sorted((v["rank"], v["logprob"]) for v in entry.values())
        assert [lp for _, lp in ranked] == sorted((lp for _, lp in ranked), reverse=True)
    assert any(entry is None for entry in field[1:]) and any(entry is not None for entry in field[1:])


def test_closing_a_stream_early_frees_its_kv_blocks(live_server):
    before = metrics(live_server)
    total = before["ovis2_kv_cache_total_blocks"]
    aborted_before = before.get('ovis2_requests_total{finished_reason="abort"}', 0.0)
    body = {
        "messages": [{"role": "user", "content": "Write a long essay"}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", live_server.base_url + "/v1/chat/completions", json=body, timeout=60
    ) as response:
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 5:
                break
        during = metrics(live_server)
        assert during["ovis2_num_requests_running"] == 1 and during["ovis2_kv_cache_free_blocks"] < total
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = metrics(live_server)
        if after["ovis2_num_requests_running"] == 0 and after["ovis2_kv_cache_free_blocks"] == total:
            break
        time.sleep(0.1)
    assert after["ovis2_num_requests_running"] == 0
    assert after["ovis2_kv_cache_free_blocks"] == total and after["ovis2_kv_cache_usage_ratio"] == 0
    assert after['ovis2_requests_total{finished_reason="abort"}'] == aborted_before + 1


def test_a_client_that_times_out_aborts_its_request(live_server):
    aborted = metrics(live_server).get('ovis2_requests_total{finished_reason="abort"}', 0.0)
    body = {
        "messages": [{"role": "user", "content": "Write a long essay"}],
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.base_url + "/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = metrics(live_server)
        if after["ovis2_num_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert after["ovis2_num_requests_running"] == 0
    assert after['ovis2_requests_total{finished_reason="abort"}'] == aborted + 1
    assert after["ovis2_kv_cache_free_blocks"] == after["ovis2_kv_cache_total_blocks"]


def test_a_cache_salt_shares_cached_prefixes_only_within_its_tenant(client, live_server):
    text = " ".join(f"salted word {k} of a long prompt" for k in range(12))
    messages = [{"role": "user", "content": text}]

    def cached(**salt) -> tuple[int, int]:
        usage = client.chat.completions.create(
            model=live_server.model, messages=messages, max_tokens=1, extra_body=salt
        ).usage
        return usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

    cached(cache_salt="tenant-a")
    hit, prompt_tokens = cached(cache_salt="tenant-a")
    assert hit >= prompt_tokens - 16
    assert (
        cached(cache_salt="tenant-b")[0] == 0
    )  # not even the system turn: nothing was cached under this salt
    assert cached()[0] <= 14  # unsalted requests never see a salted prefix (at most others' system turn)

    def completion_cached(salt: str) -> int:
        usage = client.completions.create(
            model=live_server.model, prompt=text, max_tokens=1, extra_body={"cache_salt": salt}
        ).usage
        return usage.prompt_tokens_details.cached_tokens

    completion_cached("tenant-c")
    assert completion_cached("tenant-c") >= 32 and completion_cached("tenant-d") == 0

    def response_cached(**salt) -> int:
        usage = client.responses.create(
            model=live_server.model, input=text, max_output_tokens=1, extra_body=salt
        ).usage
        return usage.input_tokens_details.cached_tokens

    assert (
        response_cached(cache_salt="tenant-a") >= prompt_tokens - 16
    )  # the chat request's prompt, same tenant
    assert response_cached(cache_salt="tenant-e") == 0


def test_metrics_after_traffic(live_server):
    values = metrics(live_server)
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert values[f"ovis2_{name}_count"] > 0, name
    assert values["ovis2_image_tokens_total"] > 0 and values["ovis2_images_total"] > 0
    assert values["ovis2_prompt_tokens_total"] > values["ovis2_image_tokens_total"]
    assert values["ovis2_generation_tokens_total"] > 0
    assert values["ovis2_num_requests_waiting"] == 0


def test_models_and_health(live_server):
    assert httpx.get(live_server.base_url + "/health").status_code == 200
    models = httpx.get(live_server.base_url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [live_server.model]


def test_greedy_image_answer_equals_transformers_generate(client, live_server, image_url):
    import torch
    import transformers

    image = Image.new("RGB", (600, 900), (120, 30, 200))
    processor = transformers.AutoProcessor.from_pretrained(live_server.checkpoint, backend="pil")
    model = transformers.Ovis2ForConditionalGeneration.from_pretrained(
        live_server.checkpoint, dtype=torch.float32
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    with torch.inference_mode():
        generated = model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = processor.tokenizer.decode(
        generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    response = client.chat.completions.create(
        model=live_server.model, messages=chat_messages(image_url), max_tokens=12, temperature=0
    )
    assert response.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert response.choices[0].message.content == expected


LIVE_BAD_IMAGES = [(url, words) for url, words in BAD_IMAGES if not url.startswith("http://127.0.0.1")]


def test_every_bad_input_gets_its_status_and_the_server_keeps_serving(live_server):
    url = live_server.base_url + "/v1/chat/completions"
    text = [{"role": "user", "content": "hi"}]
    for fields, _ in BAD_CHAT_FIELDS:
        response = httpx.post(url, json={"messages": text, **fields}, timeout=30)
        assert response.status_code == 400, (fields, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for image, words in LIVE_BAD_IMAGES:
        response = httpx.post(url, json={"messages": [image_message(image)], "max_tokens": 1}, timeout=30)
        assert response.status_code == 400, (image[:60], response.text)
        assert words.lower() in response.json()["error"]["message"].lower()
    assert httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, json={"model": "nope", "messages": text}).status_code == 404
    assert httpx.post(url, content=b"x" * (33 * 1024 * 1024)).status_code == 413
    assert httpx.post(url, json={"messages": text, "max_tokens": 2}, timeout=30).status_code == 200


def test_requests_may_lower_the_default_tile_cap_never_raise_it(live_server):
    """No --max-tiles-per-image: the compat's default (12 for transformers) caps every request, /tokenize too."""
    messages = [image_message(data_url(image_bytes(size=(3000, 3000))))]
    for route in ("/v1/chat/completions", "/tokenize"):
        for tiles in (13, 16, 64, 100):
            body = {"messages": messages, "max_tiles_per_image": tiles}
            response = httpx.post(live_server.base_url + route, json=body, timeout=60)
            assert response.status_code == 400, (route, tiles, response.text)
            error = response.json()["error"]
            assert error["param"] == "max_tiles_per_image" and "at most 12" in error["message"], error
    counts = [
        httpx.post(
            live_server.base_url + "/tokenize",
            json={"messages": messages, "max_tiles_per_image": tiles},
            timeout=60,
        ).json()["image_tokens"]
        for tiles in (None, 12, 4, 1)
    ]
    assert counts[0] == counts[1] > counts[2] > counts[3] == 259


def readme_curl_example() -> str | None:
    readme = ROOT / "README.md"
    if not readme.exists():
        return None
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", readme.read_text(), re.S):
        if "curl" in block and "/v1/chat/completions" in block:
            return block
    return None


def test_readme_curl_example_runs_as_written(live_server):
    block = readme_curl_example()
    if block is None:
        pytest.skip("README.md has no curl example for /v1/chat/completions yet")
    command = re.sub(r"(localhost|127\.0\.0\.1|0\.0\.0\.0):8000", f"127.0.0.1:{live_server.port}", block)
    command = "\n".join(line for line in command.splitlines() if not line.lstrip().startswith("$ make"))
    command = re.sub(r"^\$ ", "", command, flags=re.M)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"chat.completion' in result.stdout, shlex.quote(result.stdout[:500])


@pytest.mark.stops_live_server
def test_sigterm_finishes_in_flight_requests_then_exits_0(live_server):
    """Runs last: it stops the shared server."""
    results = {}

    def long_request():
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 120, "ignore_eos": True}
        response = httpx.post(live_server.base_url + "/v1/chat/completions", json=body, timeout=120)
        results["status"] = response.status_code
        results["body"] = response.json()

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 30
    while metrics(live_server)["ovis2_num_requests_running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    live_server.process.terminate()
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # no longer accepting
        httpx.get(live_server.base_url + "/health", timeout=2)
    thread.join(90)
    assert live_server.process.wait(60) == 0, live_server.logs()
    assert results["status"] == 200
    assert results["body"]["usage"]["completion_tokens"] == 120
