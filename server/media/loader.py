"""ImageLoader: `image_url` URLs -> decoded PIL images, fetched at once and decoded under the pixel budget
(server/pixel_budget.py: decoded pixels held at once, across all requests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from PIL import Image

from ..aio import results_or_first_error, wait_even_if_cancelled
from ..pixel_budget import PixelBudget, PixelBudgetExceeded
from .byte_budget import BytesHold
from .errors import MediaError
from .fetch import MediaFetcher
from .image import decode_pixels, open_image, upright_size
from .policy import MediaPolicy

DEFAULT_PIXELS_IN_FLIGHT = 400_000_000  # Pillow keeps RGB(A) at 4 bytes a pixel: about 1.6 GB decoded


@dataclass
class ImageLoader:
    """Turns `image_url` URLs into PIL images under a MediaPolicy."""

    policy: MediaPolicy = field(default_factory=MediaPolicy)
    transport: httpx.AsyncBaseTransport | None = None  # tests may inject one
    budget: PixelBudget = field(default_factory=lambda: PixelBudget(DEFAULT_PIXELS_IN_FLIGHT))

    @asynccontextmanager
    async def decoded(self, urls: list[tuple[str, str]]) -> AsyncIterator[list[Image.Image]]:
        """The images of every (url, param), decoded and held (against the pixel budget) until the block ends.

        All are fetched and their headers checked at once (the first failure in part order wins and names its
        part; the other fetches are cancelled); then the pixels of all of them are taken from the budget in one
        go, waiting for other requests to give theirs back when the budget is spent, and the images are decoded.
        Every image is closed when the block ends, and no decoding thread outlives the hold."""
        opened = await self._open_all(urls)
        decoded: list[Image.Image] = []
        try:
            pixels = sum(image.size[0] * image.size[1] for image in opened)
            try:
                self.budget.check(pixels)
            except PixelBudgetExceeded as exc:
                raise MediaError(f"{exc} the server decodes at once", param="messages") from None
            async with self.budget.hold(pixels):
                decoded = await _decode_all(opened, [param for _, param in urls])
                yield decoded
        finally:
            for image in (*opened, *decoded):
                image.close()

    async def sizes(
        self, urls: list[tuple[str, str]], hold: BytesHold | None = None
    ) -> list[tuple[int, int]]:
        """The upright (width, height) of every (url, param), fetched and header-checked; no pixel is decoded."""
        opened = await self._open_all(urls, hold)
        try:
            return await asyncio.to_thread(lambda: [upright_size(image) for image in opened])
        finally:
            for image in opened:
                image.close()

    async def _open_all(
        self, urls: list[tuple[str, str]], hold: BytesHold | None = None
    ) -> list[Image.Image]:
        if not urls:
            return []
        tasks = [asyncio.ensure_future(self.open(url, param, hold)) for url, param in urls]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()  # the rest, after a failure or when the caller is cancelled
            await asyncio.wait(tasks)
        return results_or_first_error(tasks, Image.Image.close)

    async def open(self, url: str, param: str | None = None, hold: BytesHold | None = None) -> Image.Image:
        """Fetched and header-checked, not decoded; its bytes taken into `hold`."""
        try:
            data = await MediaFetcher(self.policy, self.transport, hold=hold).read_bytes(url)
            return await asyncio.to_thread(open_image, data, self.policy.max_image_pixels)
        except MediaError as exc:
            exc.param = exc.param or param
            raise

    async def load(self, url: str, param: str | None = None) -> Image.Image:
        """One image, fetched and decoded (outside the pixel budget)."""
        return await _decode(await self.open(url, param), param)


async def _decode_all(opened: list[Image.Image], params: list[str | None]) -> list[Image.Image]:
    """Each image decoded in a thread. Every thread is waited for, also when one fails or the caller is cancelled
    (their pixels are what the budget counts); then the images in order, or the first failure in part order."""
    tasks = [
        asyncio.ensure_future(_decode(image, param)) for image, param in zip(opened, params, strict=True)
    ]
    if tasks:
        await wait_even_if_cancelled(tasks)
    return results_or_first_error(tasks, Image.Image.close)


async def _decode(image: Image.Image, param: str | None) -> Image.Image:
    try:
        return await asyncio.to_thread(decode_pixels, image)
    except MediaError as exc:
        exc.param = exc.param or param
        raise
