"""A request's images and videos together under the pixel budget (server/pixel_budget.py).

Every image and video is fetched at once, images header-checked and videos' packets read (the first failure,
images before videos, in part order, wins and names its part; the others are cancelled). Then the pixels of
all of them, each video's sampled frames included, are taken from the budget in one go, so two requests never
each hold a part and wait on each other, and everything is decoded: images in threads, videos in the video
pool. All of it is closed when the block ends, and no decoding thread outlives the hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from PIL import Image

from ..aio import results_or_first_error, wait_even_if_cancelled
from ..pixel_budget import PixelBudgetExceeded
from .byte_budget import BytesHold
from .errors import MediaError
from .image import decode_pixels
from .loader import ImageLoader
from .video import FrameRequest, OpenedVideo, VideoLoader

ImageURL = tuple[str, str]  # (url, param)
VideoURL = tuple[str, FrameRequest, str]  # (url, frames wanted, param)


@asynccontextmanager
async def decoded_media(
    images: ImageLoader,
    videos: VideoLoader,
    image_urls: list[ImageURL],
    video_urls: list[VideoURL],
    max_frames: int,
    hold: BytesHold | None = None,
) -> AsyncIterator[tuple[list[Image.Image], list[list[Image.Image]]]]:
    """(the decoded images, each video's frames), held against the pixel budget until the block ends; the
    encoded bytes taken into `hold` as they arrive."""
    opened = await _open_all(images, videos, image_urls, video_urls, hold)
    decoded: list = []
    try:
        _check_frames(opened[len(image_urls) :], max_frames)
        pixels = sum(_pixels(item) for item in opened)
        try:
            images.budget.check(pixels)
        except PixelBudgetExceeded as exc:
            what = "images and video frames" if video_urls else "images"
            raise MediaError(
                f"the {what} have {pixels} pixels in total, more than the limit of {images.budget.total} "
                "the server decodes at once",
                param="messages",
            ) from exc
        async with images.budget.hold(pixels):
            decoded = await _decode_all(
                videos, opened, [u[-1] for u in image_urls] + [u[-1] for u in video_urls]
            )
            yield decoded[: len(image_urls)], decoded[len(image_urls) :]
    finally:
        for item in (*opened, *decoded):
            _close(item)


async def video_frame_counts(
    videos: VideoLoader, video_urls: list[VideoURL], hold: BytesHold | None = None
) -> list[tuple[int, tuple[int, int]]]:
    """(frames it gives, frame size) of each video: fetched and its packets read, no frame decoded."""
    opened = await _open_all(None, videos, [], video_urls, hold)
    try:
        return [(video.num_frames, video.frame_size) for video in opened]
    finally:
        for video in opened:
            video.close()


async def _open_all(
    images: ImageLoader | None,
    videos: VideoLoader,
    image_urls: list[ImageURL],
    video_urls: list[VideoURL],
    hold: BytesHold | None = None,
) -> list:
    jobs = [images.open(url, param, hold) for url, param in image_urls] if images is not None else []
    jobs += [videos.open(url, frames, param, hold) for url, frames, param in video_urls]
    if not jobs:
        return []
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # the rest, after a failure or when the caller is cancelled
        await asyncio.wait(tasks)
    return results_or_first_error(tasks, _close)


def _check_frames(opened: list[OpenedVideo], max_frames: int) -> None:
    total = sum(video.num_frames for video in opened)
    if total > max_frames:
        raise MediaError(
            f"the request's videos give {total} frames; at most {max_frames} are allowed (ask for fewer "
            "with num_video_frames)",
            param="messages",
            code="invalid_video",
        )


async def _decode_all(videos: VideoLoader, opened: list, params: list[str]) -> list:
    """Each image decoded in a thread, each video in the video pool. Every one is waited for, also when one fails or
    the caller is cancelled (their pixels are what the budget counts); then all in order, or the first failure."""
    tasks = [
        asyncio.ensure_future(_decode_one(videos, item, param))
        for item, param in zip(opened, params, strict=True)
    ]
    if tasks:
        await wait_even_if_cancelled(tasks)
    return results_or_first_error(tasks, _close)


async def _decode_one(videos: VideoLoader, item, param: str):
    if isinstance(item, OpenedVideo):
        return await videos.decode(item, param)
    try:
        return await asyncio.to_thread(decode_pixels, item)
    except MediaError as exc:
        exc.param = exc.param or param
        raise


def _pixels(item) -> int:
    return item.pixels if isinstance(item, OpenedVideo) else item.size[0] * item.size[1]


def _close(item) -> None:
    for thing in item if isinstance(item, list) else [item]:
        thing.close()
