"""Videos end to end on the shared real server (demo checkpoint, compat transformers: a frame is one crop in both
compats) with the official `openai` client and raw HTTP: data-URL and http videos, streaming and not, usage, the
recipe's prompt, a second turn served by the caches, and every bad video a 400 while good requests go on."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.server.conftest import LIVE_VIDEO_LIMITS, data_url
from tests.test_processing_video import original_ids
from tests.test_video import BAD_VIDEOS
from tests.videos import encode, gray

pytestmark = pytest.mark.slow
QUESTION = "What happens in the video?"
FRAME_TOKENS = 259


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def video_messages(url: str, text: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def tokenize(live_server, messages, **fields) -> dict:
    return httpx.post(
        live_server.base_url + "/tokenize", json={"messages": messages, **fields}, timeout=60
    ).json()


def test_a_data_url_video_with_the_sdk_and_its_usage(client, live_server, videos, tokenizer):
    messages = video_messages(data_url(videos.h264, "video/mp4"))
    response = client.chat.completions.create(
        model=live_server.model, messages=messages, max_tokens=4, temperature=0
    )
    assert response.choices[0].message.content and response.choices[0].finish_reason in ("stop", "length")
    text_only = tokenize(live_server, [{"role": "user", "content": QUESTION}])["count"]
    usage = response.usage
    assert usage.prompt_tokens_details.image_tokens == 12 * FRAME_TOKENS  # the recipe's 12 frames
    assert usage.prompt_tokens == text_only + 12 * (FRAME_TOKENS + 1)  # each frame, and the newline after it
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    counted = tokenize(live_server, messages)
    query = "\n".join(["<image>"] * 12) + "\n" + QUESTION
    assert counted["count"] == usage.prompt_tokens
    assert counted["tokens"] == original_ids(
        tokenizer, [("human", query)], 12
    )  # the original recipe's prompt


def test_an_http_video_streamed_with_the_async_sdk(live_server, image_server, videos):
    image_server.files["/e2e.webm"] = (videos.vp9, "video/webm")

    async def run():
        async with AsyncOpenAI(
            base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model=live_server.model,
                messages=video_messages(image_server.url("/e2e.webm")),
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"num_video_frames": 6},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens_details.image_tokens == 6 * FRAME_TOKENS
    counted = tokenize(live_server, video_messages(image_server.url("/e2e.webm")), num_video_frames=6)
    assert usage.prompt_tokens == counted["count"]


def test_a_second_turn_resending_the_video_runs_the_vision_tower_zero_times(client, live_server, videos):
    messages = video_messages(data_url(videos.gop5, "video/mp4"))

    def ask(conversation):
        return client.chat.completions.create(
            model=live_server.model, messages=conversation, max_tokens=4, temperature=0
        )

    first = ask(messages)
    encoded = live_server.metrics()["ovis2_vision_encoded_images_total"]
    follow_up = [
        *messages,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And after that?"},
    ]
    second = ask(follow_up)
    again = ask(messages)
    assert live_server.metrics()["ovis2_vision_encoded_images_total"] == encoded  # zero vision tower runs
    assert again.choices[0].message.content == first.choices[0].message.content  # same tokens
    assert (
        second.usage.prompt_tokens_details.cached_tokens >= 12 * FRAME_TOKENS
    )  # the video's KV blocks reused


def past_the_limits() -> dict[str, tuple[bytes, str]]:
    """Videos past the live server's video flags (LIVE_VIDEO_LIMITS), each with the words its 400 says."""
    return {
        "seconds": (encode([gray(0), gray(1)], pts=[0, 40_000]), "40.1s long; at most 30s"),
        "stream frames": (
            encode([gray(0)] * (LIVE_VIDEO_LIMITS["--max-video-stream-frames"] + 1)),
            "more than 200 frames",
        ),
        "frame pixels": (encode([np.zeros((300, 400, 3), np.uint8)], size=(400, 300)), "400x300"),
    }


def test_every_bad_video_gets_its_400_in_bounded_time_while_good_requests_succeed(
    live_server, image_server, videos
):
    bad = {name: (getattr(videos, name), words.replace("\\", "")) for name, words in BAD_VIDEOS.items()}
    bad.update(past_the_limits())
    image_server.files["/huge.mp4"] = (b"\0\0\0\x18ftypisom" + bytes(400_000), "video/mp4")
    urls = {name: data_url(data, "video/mp4") for name, (data, _) in bad.items()}
    urls["bytes"], words = image_server.url("/huge.mp4"), {name: w for name, (_, w) in bad.items()}
    words["bytes"] = "larger than 300000 bytes"
    words["claims_longer"] = "200.0s long; at most 30s"  # past --max-video-seconds before its frames are read
    for bomb in ("index_bomb", "fragment_bomb"):  # the server's own frame limit sets the bound
        words[bomb] = "index declares 3000000 entries"
    good = [video_messages(data_url(videos.h264, "video/mp4"))] * 2 + [
        [{"role": "user", "content": "hi"}]
    ] * 2

    async def post(http, messages):
        started = time.monotonic()
        body = {"messages": messages, "max_tokens": 2}
        response = await http.post(live_server.chat_url, json=body)
        return response, time.monotonic() - started

    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            jobs = [post(http, video_messages(url)) for url in urls.values()] + [post(http, m) for m in good]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for name, (response, seconds) in zip(urls, results, strict=False):
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_video" and error["param"] == "messages[0].content[0].video_url", (
            error
        )
        assert words[name].lower() in error["message"].lower(), (name, error)
        assert seconds < 30, name
    for response, _ in results[len(urls) :]:
        assert response.status_code == 200, response.text
    assert live_server.wait_idle()["ovis2_num_requests_running"] == 0
