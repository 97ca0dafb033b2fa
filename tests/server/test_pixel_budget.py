"""The process-wide budget on decoded image pixels (server/pixel_budget.py) and the loader that uses it."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from PIL import Image

from server.aio import finish_in_thread
from server.media import ImageLoader, MediaError, MediaPolicy
from server.media import loader as media_loader
from server.pixel_budget import PixelBudget, PixelBudgetExceeded
from tests.server.conftest import data_url, image_bytes, image_message


async def _enter(budget: PixelBudget, pixels: int, log: list, name: str, release: asyncio.Event) -> None:
    async with budget.hold(pixels):
        log.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_beyond_the_budget_wait_their_turn_in_order():
    async def scenario():
        budget, log = PixelBudget(100), []
        releases = {name: asyncio.Event() for name in "abc"}
        tasks = [
            asyncio.create_task(_enter(budget, pixels, log, name, releases[name]))
            for name, pixels in (("a", 60), ("b", 50), ("c", 10))
        ]
        await _settle()
        assert (
            log == ["a"] and budget.in_use == 60 and budget.num_waiting == 2
        )  # c would fit, but b came first
        releases["a"].set()
        await _settle()
        assert log == ["a", "b", "c"] and budget.in_use == 60
        releases["b"].set(), releases["c"].set()
        await asyncio.gather(*tasks)
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_takes_nothing():
    async def scenario():
        budget, log = PixelBudget(100), []
        hold_a, never = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(_enter(budget, 80, log, "a", hold_a))
        b = asyncio.create_task(_enter(budget, 90, log, "b", never))
        c = asyncio.create_task(_enter(budget, 20, log, "c", asyncio.Event()))
        await _settle()
        b.cancel()  # the client went away while waiting; c, behind it, fits now
        await _settle()
        assert log == ["a", "c"] and budget.in_use == 100
        c.cancel()
        hold_a.set()
        await asyncio.gather(a, return_exceptions=True)
        await asyncio.gather(b, c, return_exceptions=True)
        assert budget.in_use == 0 and not budget._waiters

    asyncio.run(scenario())


def test_one_request_larger_than_the_budget_is_refused():
    async def scenario():
        async with PixelBudget(10).hold(11):
            pass

    with pytest.raises(PixelBudgetExceeded):
        asyncio.run(scenario())


def _palette_png(size: tuple[int, int]) -> bytes:
    """A few hundred bytes that decode to width * height pixels."""
    buffer = io.BytesIO()
    Image.new("P", size, 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_loader_holds_decoded_images_within_the_budget():
    bomb = data_url(_palette_png((1000, 1000)))
    assert len(bomb) < 2000

    async def scenario():
        loader = ImageLoader(MediaPolicy(), budget=PixelBudget(1_500_000))
        log = []

        async def request(name: str, pause: float) -> None:
            async with loader.decoded([(bomb, "p")]) as images:
                log.append((name, "in", loader.budget.in_use))
                assert images[0].size == (1000, 1000) and images[0].mode == "P"  # as decoded
                await asyncio.sleep(pause)
                log.append((name, "out"))

        await asyncio.gather(request("first", 0.2), request("second", 0.0))
        return log, loader.budget.in_use

    log, left = asyncio.run(scenario())
    assert log == [
        ("first", "in", 1_000_000),
        ("first", "out"),
        ("second", "in", 1_000_000),
        ("second", "out"),
    ]
    assert left == 0


def test_loader_refuses_a_request_whose_images_exceed_the_budget():
    loader = ImageLoader(MediaPolicy(), budget=PixelBudget(1_500_000))
    urls = [(data_url(_palette_png((1000, 1000))), f"messages[0].content[{i}]") for i in range(2)]

    async def scenario():
        async with loader.decoded(urls):
            pass

    with pytest.raises(MediaError) as info:
        asyncio.run(scenario())
    assert "2000000 pixels in total" in info.value.message and info.value.param == "messages"
    assert loader.budget.in_use == 0


def test_server_answers_400_and_keeps_serving(make_client):
    client = make_client(max_image_pixels=5000, max_image_pixels_in_flight=5000)
    each = data_url(
        image_bytes(size=(60, 50))
    )  # 3000 pixels: each image is allowed, the two together are not
    two = {"role": "user", "content": [*image_message(each)["content"], image_message(each)["content"][1]]}
    response = client.post("/v1/chat/completions", json={"messages": [two], "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "pixels in total" in error["message"]
    small = data_url(image_bytes(size=(40, 30)))
    response = client.post("/v1/chat/completions", json={"messages": [image_message(small)], "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_metrics_show_the_budget(client):
    text = client.get("/metrics").text
    assert 'ovis2_image_pixels_in_flight{model_name="fake-model"} 0.0' in text
    assert 'ovis2_requests_waiting_for_image_pixels{model_name="fake-model"} 0.0' in text
    assert 'ovis2_media_bytes_in_flight{model_name="fake-model"} 0.0' in text


def test_a_waiter_cancelled_just_before_a_release_breaks_nothing():
    """The release's grant must skip a waiter whose task was cancelled but has not run yet."""

    async def scenario():
        budget, release = PixelBudget(10), asyncio.Event()

        async def holder():
            async with budget.hold(10):
                await release.wait()
            return "held"

        async def waiter():
            async with budget.hold(5):
                return "never"

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        second = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        release.set()
        second.cancel()  # in the same loop iteration as the release
        results = await asyncio.gather(first, second, return_exceptions=True)
        async with asyncio.timeout(1):
            async with budget.hold(10):
                pass
        return results, budget.in_use, budget.num_waiting

    (held, cancelled), in_use, waiting = asyncio.run(scenario())
    assert held == "held" and isinstance(cancelled, asyncio.CancelledError) and in_use == 0 and waiting == 0


def test_no_pixels_never_wait():
    async def scenario():
        budget = PixelBudget(10)
        async with budget.hold(10):
            blocked = asyncio.create_task(_enter(budget, 5, [], "blocked", asyncio.Event()))
            await _settle()
            async with asyncio.timeout(0.5):
                async with budget.hold(0):
                    pass
            blocked.cancel()
        return budget.in_use

    assert asyncio.run(scenario()) == 0


def test_a_failed_decode_waits_for_the_other_decodes(monkeypatch):
    """Their threads hold pixels the budget counts: the hold must not end (or the images close) under them."""
    finished = []
    real_decode = media_loader.decode_pixels

    def decode(image):
        if image.size == (10, 10):
            raise MediaError("the image file is corrupt or truncated")
        time.sleep(0.3)
        finished.append(loader.budget.in_use)
        return real_decode(image)

    monkeypatch.setattr(media_loader, "decode_pixels", decode)
    loader = ImageLoader(MediaPolicy(), budget=PixelBudget(10**6))
    urls = [(data_url(image_bytes(size=(200, 100))), "good"), (data_url(image_bytes(size=(10, 10))), "bad")]

    async def scenario():
        async with loader.decoded(urls):
            pass

    with pytest.raises(MediaError) as info:
        asyncio.run(scenario())
    assert info.value.param == "bad" and finished == [200 * 100 + 10 * 10] and loader.budget.in_use == 0


def _slow_image_server(answered: list):
    """An httpx handler that answers an image after 0.5 s and records the URLs it answered."""

    async def handler(request):
        await asyncio.sleep(0.5)
        answered.append(request.url)
        return httpx.Response(200, content=image_bytes(), headers={"content-type": "image/png"})

    return handler


def test_a_failed_fetch_cancels_the_other_fetches():
    answered: list = []
    loader = ImageLoader(MediaPolicy(), transport=httpx.MockTransport(_slow_image_server(answered)))
    urls = [("http://93.184.216.34/a.png", "slow"), ("data:image/png;base64,AAAA", "broken")]

    async def scenario():
        start = time.monotonic()
        with pytest.raises(MediaError) as info:
            async with loader.decoded(urls):
                pass
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.7)
        return info.value, elapsed

    error, elapsed = asyncio.run(scenario())
    assert error.param == "broken" and elapsed < 0.4 and answered == []


def test_finish_in_thread_outlives_a_cancellation():
    async def scenario():
        task = asyncio.create_task(finish_in_thread(time.sleep, 0.3))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.2


def test_cancelling_a_request_while_it_fetches_cancels_the_fetches():
    answered: list = []
    loader = ImageLoader(MediaPolicy(), transport=httpx.MockTransport(_slow_image_server(answered)))
    urls = [(f"http://93.184.216.{i}/a.png", f"p{i}") for i in (1, 2)]

    async def request():
        async with loader.decoded(urls):
            pass

    async def scenario():
        task = asyncio.create_task(request())
        await asyncio.sleep(0.1)
        task.cancel()
        start = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.6)
        return elapsed

    assert asyncio.run(scenario()) < 0.2 and answered == [] and loader.budget.in_use == 0
