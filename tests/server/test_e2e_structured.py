"""End to end on the shared real server (random-weight demo model): structured outputs through the official
`openai` client, and /v1/responses against the equivalent chat request. The weights are random, so whatever
holds here holds because of the constraint."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from ovis2.tokenizer import build_tokenizer
from tests.live_server import ROOT
from tests.server.conftest import data_url, image_bytes

pytestmark = pytest.mark.slow
SEEDS = range(20)


class Receipt(BaseModel):
    """Every field bounded, so the grammar ends within max_tokens whatever the model samples."""

    merchant: str = Field(max_length=16)
    total_cents: int = Field(ge=0, le=999999)
    currency: Literal["EUR", "USD", "GBP"]
    paid: bool


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def image_url() -> str:
    return data_url(image_bytes(size=(64, 48), color=(30, 120, 200)))


def receipt_messages(image_url: str | None) -> list[dict]:
    parts = [{"type": "text", "text": "Extract the receipt."}]
    if image_url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url, "detail": "low"}})
    return [{"role": "user", "content": parts}]


def parse_receipt(client: OpenAI, model: str, messages: list[dict], seed: int, stream: bool):
    fields = dict(model=model, messages=messages, response_format=Receipt, seed=seed, max_tokens=150)
    if not stream:
        return client.chat.completions.parse(**fields)
    with client.chat.completions.stream(**fields) as events:
        for _ in events:
            pass
        return events.get_final_completion()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_parse_with_a_pydantic_model_gives_a_valid_instance_for_20_seeds(
    client, live_server, image_url, stream, with_image
):
    messages = receipt_messages(image_url if with_image else None)
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        completions = list(
            pool.map(lambda s: parse_receipt(client, live_server.model, messages, s, stream), SEEDS)
        )
    for completion in completions:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Receipt), choice
        assert choice.message.parsed == Receipt.model_validate_json(choice.message.content)
    assert len({c.choices[0].message.content for c in completions}) > 1  # the seeds matter


def closing_token_bias() -> dict[str, int]:
    """Random weights almost never close an open JSON string or object on their own: favour the tokens that do
    (the grammar still decides where each may go)."""
    tokenizer = build_tokenizer()
    return {str(tokenizer.convert_tokens_to_ids(t)): 8 for t in ('"', "}", "]", '"}', '",', '"]', '":')}


def test_json_object_outputs_parse(client, live_server):
    bias = closing_token_bias()

    def ask(seed: int):
        return client.chat.completions.create(
            model=live_server.model,
            messages=receipt_messages(None),
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=400,
            logit_bias=bias,
        )

    with ThreadPoolExecutor(10) as pool:
        completions = list(pool.map(ask, range(10)))
    for completion in completions:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_regex_and_a_choice_hold(client, live_server):
    regex = client.chat.completions.create(
        model=live_server.model,
        messages=receipt_messages(None),
        n=3,
        seed=4,
        max_tokens=30,
        extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{2,4}"}},
    )
    assert all(re.fullmatch(r"[A-Z]{3}-\d{2,4}", c.message.content) for c in regex.choices), regex
    choices = ["approved", "rejected", "needs review"]
    choice = client.completions.create(
        model=live_server.model,
        prompt="Verdict:",
        n=4,
        seed=5,
        max_tokens=10,
        extra_body={"guided_choice": choices},
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in choice.choices), choice


@pytest.mark.parametrize(
    ("response_format", "extra", "param", "reason"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
            {},
            "response_format.json_schema.schema",
            'Unsupported type "foo"',
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
            {},
            "response_format.json_schema.schema",
            "unique array items",
        ),
        (
            None,
            {"structured_outputs": {"regex": "(ab"}},
            "structured_outputs.regex",
            "parenthesis is not closed",
        ),
        (None, {"guided_grammar": "root ::= missing"}, "guided_grammar", 'Rule "missing" is not defined'),
    ],
)
def test_a_constraint_that_cannot_be_compiled_is_a_400_before_it_is_queued(
    client, live_server, response_format, extra, param, reason
):
    before = live_server.metrics()
    fields = {"response_format": response_format} if response_format else {}
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(
            model=live_server.model, messages=receipt_messages(None), max_tokens=5, extra_body=extra, **fields
        )
    error = caught.value.body
    assert error["param"] == param and reason in error["message"] and ".cc:" not in error["message"]
    after = live_server.metrics()
    assert after.get("ovis2_prompt_tokens_total", 0) == before.get(
        "ovis2_prompt_tokens_total", 0
    )  # never ran


DEAD_END = {  # a string of characters from an empty class: the opening quote is allowed, then nothing
    "type": "json_schema",
    "json_schema": {"name": "never", "schema": {"type": "string", "pattern": "[^\\s\\S]"}},
}


def streamed_error(url: str, body: dict) -> dict:
    """The error of a stream that fails: the last event before [DONE] once text went out, or a plain error answer
    when the failure came with the first output (a slow reader gets both merged into one)."""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as stream:
        if stream.status_code != 200:
            stream.read()
            return stream.json()["error"]
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines
    return json.loads(lines[-2][6:])["error"]


def test_a_constraint_at_a_dead_end_is_a_400_whole_and_an_error_event_streamed(client, live_server):
    fields = dict(model=live_server.model, messages=receipt_messages(None), max_tokens=8)
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(response_format=DEAD_END, **fields)
    assert caught.value.body["message"].startswith("the JSON schema allows no token after the 1 generated")
    assert caught.value.body["param"] == "response_format.json_schema.schema"
    error = streamed_error(live_server.chat_url, {**fields, "response_format": DEAD_END})
    assert error["type"] == "invalid_request_error" and "allows no token" in error["message"]
    assert error["param"] == "response_format.json_schema.schema"
    completion = {
        "prompt": "Say it",
        "max_tokens": 8,
        "structured_outputs": {"json": DEAD_END["json_schema"]["schema"]},
    }
    error = streamed_error(live_server.base_url + "/v1/completions", completion)
    assert error["param"] == "structured_outputs.json" and "allows no token" in error["message"]
    # the server goes on answering
    assert client.chat.completions.create(**fields).choices[0].finish_reason in ("stop", "length")


def image_input(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Describe the image."},
                {"type": "input_image", "image_url": url},
            ],
        }
    ]


def test_responses_create_with_an_image_gives_the_chat_answer(client, live_server, image_url):
    chat = client.chat.completions.create(
        model=live_server.model,
        max_tokens=12,
        temperature=0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the image."},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            },
        ],
    )
    fields = dict(
        model=live_server.model,
        instructions="Be brief.",
        input=image_input(image_url),
        max_output_tokens=12,
        temperature=0,
    )
    whole = client.responses.create(**fields)
    events = list(client.responses.create(**fields, stream=True))
    answer = chat.choices[0].message.content
    assert answer and whole.output_text == answer
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer
    final = events[-1].response
    assert final.output_text == answer and events[0].type == "response.created"
    assert whole.usage.input_tokens == final.usage.input_tokens == chat.usage.prompt_tokens
    assert whole.usage.input_tokens_details.image_tokens == chat.usage.prompt_tokens_details.image_tokens > 0
    assert whole.usage.output_tokens == chat.usage.completion_tokens
    assert whole.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")


def test_responses_parse_with_a_pydantic_model(client, live_server, image_url):
    response = client.responses.parse(
        model=live_server.model, input=image_input(image_url), text_format=Receipt, max_output_tokens=150
    )
    assert isinstance(response.output_parsed, Receipt) and response.status == "completed"


def test_grammar_metrics_count_compiles_and_cache_hits(client, live_server):
    before = live_server.metrics()
    for seed in range(3):  # one new constraint: one compile, then two cache hits
        client.chat.completions.create(
            model=live_server.model,
            messages=receipt_messages(None),
            seed=seed,
            max_tokens=10,
            extra_body={"guided_regex": "(yes|no) [0-9]"},
        )
    after = live_server.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('ovis2_structured_requests_total{kind="regex"}') == 3
    assert grew("ovis2_grammar_compile_seconds_count") == 1 and grew("ovis2_grammar_compile_seconds_sum") > 0
    assert grew("ovis2_grammar_cache_hits_total") == 2
    assert "# TYPE ovis2_grammar_compile_seconds summary" in httpx.get(live_server.base_url + "/metrics").text


def readme_block(title: str) -> str:
    """The first python block after the README heading `title`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"### {title}\n") :]
    return section[
        section.index("```python\n") + len("```python\n") : section.index("\n```", section.index("```python"))
    ]


def test_the_readme_examples_run_as_written(client, live_server, image_url):
    for title, url, check in (
        ("Structured outputs", "https://example.com/receipt.jpg", "receipt"),
        ("The Responses API", "https://example.com/cat.jpg", "response"),
    ):
        block = (
            readme_block(title)
            .replace(url, image_url)
            .replace('model="demo"', f'model="{live_server.model}"')
        )
        scope = {"client": client}
        exec(compile(block, f"README: {title}", "exec", dont_inherit=True), scope)  # the README as written
        if check == "receipt":
            assert isinstance(scope["receipt"], scope["Receipt"])
        else:
            assert scope["response"].output_text and scope["response"].usage.input_tokens > 259
