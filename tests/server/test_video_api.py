"""video_url parts through the HTTP API on the fake engine: frames reach the processor, limits are 400s naming the
part, /tokenize counts frames without decoding, the pixel budget counts frames, metrics count videos."""

from __future__ import annotations

import pytest

from tests.live_server import parse_metrics
from tests.server.conftest import data_url, image_bytes
from tests.server.test_errors import assert_error
from tests.test_video import BAD_VIDEOS
from tests.videos import frame_index

QUESTION = {"type": "text", "text": "What happens?"}


def video_message(url: str, *more) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, *more, QUESTION]}


def mp4_url(data: bytes) -> str:
    return data_url(data, "video/mp4")


def chat(client, messages, **fields):
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **fields})


def sent_frames(fake_engine) -> list[list]:
    """The frames of each video part the processor got in its last prepare_chat call (copies: the server closes
    the frames once the prompt is built)."""
    return fake_engine.processor.videos[-1]


def test_a_data_url_video_reaches_the_processor_as_its_sampled_frames(client, fake_engine, videos):
    response = chat(client, [video_message(mp4_url(videos.h264))])
    assert response.status_code == 200, response.text
    (frames,) = sent_frames(fake_engine)
    assert [frame_index(f) for f in frames] == [
        1,
        3,
        5,
        7,
        9,
        11,
        13,
        15,
        17,
        19,
        21,
        23,
    ]  # 12 of 24, midpoints
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["image_tokens"] == 12 * 259
    inputs, _ = next(iter(fake_engine.requests.values()))
    assert inputs.num_video_frames == 12


@pytest.mark.parametrize(
    "mime, name", [("video/webm", "vp9"), ("video/quicktime", "h264"), ("video/x-matroska", "h264_mkv")]
)
def test_data_url_types(client, fake_engine, videos, mime, name):
    assert chat(client, [video_message(data_url(getattr(videos, name), mime))]).status_code == 200
    assert len(sent_frames(fake_engine)[0]) == 12


def test_an_http_video_from_an_allowed_host(make_client, fake_engine, videos, image_server):
    image_server.files["/clip.webm"] = (videos.vp9, "video/webm")
    client = make_client(allowed_media_networks=["127.0.0.1"])
    assert chat(client, [video_message(image_server.url("/clip.webm"))]).status_code == 200
    assert image_server.requests[-1][1].get("Accept") == "video/*"
    refused = make_client()  # loopback refused by default, as for images
    assert_error(
        chat(refused, [video_message(image_server.url("/clip.webm"))]),
        400,
        "messages[0].content[0].video_url",
        "private",
    )


def test_frames_per_video_and_fps(make_client, fake_engine, videos):
    client = make_client(max_video_frames=14)
    assert chat(client, [video_message(mp4_url(videos.h264))], num_video_frames=3).status_code == 200
    assert [frame_index(f) for f in sent_frames(fake_engine)[0]] == [4, 12, 20]
    assert chat(client, [video_message(mp4_url(videos.h264))], video_fps=2.0).status_code == 200
    assert len(sent_frames(fake_engine)[0]) == 5  # 2.4 s at 2 frames a second
    assert chat(client, [video_message(mp4_url(videos.h264))], video_fps=100.0).status_code == 200
    assert len(sent_frames(fake_engine)[0]) == 14  # capped by --max-video-frames
    assert_error(
        chat(client, [video_message(mp4_url(videos.h264))], num_video_frames=15),
        400,
        "num_video_frames",
        "at most 14",
    )
    assert_error(
        chat(client, [video_message(mp4_url(videos.h264))], num_video_frames=0), 400, "num_video_frames"
    )
    assert_error(chat(client, [video_message(mp4_url(videos.h264))], video_fps=-1), 400, "video_fps")


def test_several_videos_mixed_with_images_and_in_earlier_turns(make_client, fake_engine, videos):
    client = make_client(max_images_per_request=1)
    image = {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}
    messages = [
        video_message(mp4_url(videos.h264), image),
        {"role": "assistant", "content": "Gray."},
        video_message(mp4_url(videos.one_frame)),
    ]
    response = chat(client, messages, num_video_frames=4)
    assert response.status_code == 200, response.text  # 5 frames and 1 image: frames are not images
    assert [len(frames) for frames in sent_frames(fake_engine)] == [4, 1]
    assert response.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 6 * 259


def test_request_limits_on_videos_and_frames(make_client, videos):
    client = make_client(max_videos_per_request=2, max_video_frames_per_request=20)
    url = mp4_url(videos.h264)
    assert_error(
        chat(client, [video_message(url), video_message(url), video_message(url)]),
        400,
        "messages",
        "at most 2 are allowed",
    )
    error = assert_error(chat(client, [video_message(url), video_message(url)]), 400, "messages", "24 frames")
    assert error["code"] == "invalid_video"
    assert chat(client, [video_message(url), video_message(mp4_url(videos.one_frame))]).status_code == 200


@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
def test_bad_videos_are_400_naming_the_part(client, videos, name):
    error = assert_error(
        chat(client, [video_message(mp4_url(getattr(videos, name)))]),
        400,
        "messages[0].content[0].video_url",
        BAD_VIDEOS[name].replace("\\", ""),
    )
    assert error["code"] == "invalid_video"


BAD_VIDEO_URLS = [
    ("data:image/png;base64," + data_url(image_bytes())[22:], "use mp4, webm, quicktime or x-matroska"),
    ("data:video/mp4,notbase64", "data:video/mp4;base64"),
    ("ftp://example.com/a.mp4", "video_url must be an http(s)"),
    ("http://169.254.169.254/latest", "metadata"),
]


@pytest.mark.parametrize("url, words", BAD_VIDEO_URLS)
def test_bad_video_urls(client, url, words):
    assert_error(chat(client, [video_message(url)]), 400, "messages[0].content[0].video_url", words)


def test_video_limits_from_the_flags(make_client, videos):
    url = mp4_url(videos.h264)
    for flags, words in [
        ({"max_video_bytes": 1000}, "base64 video is longer than 1336 characters"),
        ({"max_video_seconds": 1.0}, "2.4s long"),
        ({"max_video_stream_frames": 10}, "more than 10 frames"),
        ({"max_video_frame_pixels": 3000, "max_image_pixels_in_flight": 40_000_000}, "64x48"),
        ({"video_decode_timeout": 1e-9}, "took longer"),
    ]:
        assert_error(
            chat(make_client(**flags), [video_message(url)]), 400, "messages[0].content[0].video_url", words
        )


def test_the_pixel_budget_counts_the_frames(make_client, videos):
    client = make_client(
        max_image_pixels=100,
        max_video_frames=2,
        max_video_frame_pixels=64 * 48,
        max_image_pixels_in_flight=2 * 64 * 48,
    )
    url = mp4_url(videos.h264)
    assert chat(client, [video_message(url)]).status_code == 200  # 2 frames of 64x48: exactly the budget
    one_pixel = {"type": "image_url", "image_url": {"url": data_url(image_bytes(size=(1, 1)))}}
    assert_error(
        chat(client, [video_message(url, one_pixel)]), 400, "messages", "more than the limit of 6144"
    )
    three = make_client(max_image_pixels=100, max_video_frames=3, max_image_pixels_in_flight=2 * 64 * 48)
    assert_error(
        chat(three, [video_message(url)], num_video_frames=3), 400, "messages", "9216 pixels in total"
    )


def test_videos_only_in_user_messages_and_parts_are_objects(client):
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    assert_error(
        chat(client, [{"role": "assistant", "content": [part]}]), 400, "messages[0].content[0]", "videos"
    )
    bad = {"type": "video_url", "video_url": "https://example.com/a.mp4"}
    assert_error(
        chat(client, [{"role": "user", "content": [bad]}]),
        400,
        "messages[0].content[0].video_url",
        "must be an object",
    )


def test_tokenize_counts_frames_without_decoding(client, fake_engine, videos):
    messages = [video_message(mp4_url(videos.vp9))]
    counted = client.post("/tokenize", json={"messages": messages, "num_video_frames": 5}).json()
    assert counted["image_tokens"] == 5 * 259
    before = parse_metrics(client.get("/metrics").text)
    assert before.get("ovis2_videos_total", 0) == 0  # /tokenize read packets, decoded nothing
    response = chat(client, messages, num_video_frames=5)
    assert response.json()["usage"]["prompt_tokens"] == counted["count"]
    after = parse_metrics(client.get("/metrics").text)
    assert after["ovis2_videos_total"] == 1 and after["ovis2_video_frames_total"] == 5
    assert after["ovis2_video_decode_seconds_count"] == 1 and after["ovis2_video_decode_seconds_sum"] > 0
    assert after.get("ovis2_images_total", 0) == 0  # frames are not counted as images


def test_a_cancelled_caller_stops_its_decoding_thread_and_waits_for_it():
    import asyncio
    import gc
    import threading

    from ovis2 import Ovis2Error
    from server.media.video import VideoLoader

    loader = VideoLoader(workers=1)
    started, stopped, ran = threading.Event(), threading.Event(), []

    def decoding(stop):
        started.set()
        while not stop.wait(0.01):  # what ovis2/video.py's deadline checks between packets
            pass
        stopped.set()
        raise Ovis2Error("decoding the video was cancelled")  # as the deadline's check raises

    async def scenario():
        unretrieved = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unretrieved.append(context))
        running = asyncio.ensure_future(loader.in_pool(decoding))
        queued = asyncio.ensure_future(loader.in_pool(lambda stop: ran.append(1)))
        await asyncio.to_thread(started.wait, 5)
        queued.cancel()
        running.cancel()
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert stopped.is_set()  # the running thread was told to stop, and waited for
        gc.collect()  # asyncio reports a future whose exception no one retrieved when it is collected
        return unretrieved

    assert asyncio.run(scenario()) == []  # the stopped thread's error is nobody's: not logged as a loop error
    loader.close()
    assert ran == []  # the queued one never started
