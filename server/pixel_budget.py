"""A cap on decoded image pixels held at once, across every request in the process.

A few kilobytes of palette PNG decode to 40 million RGB pixels (120 MB): with per-image byte and pixel caps
alone, a handful of small concurrent requests can still hold gigabytes of decoded images. Each request takes
the pixels of all its images at once (never a part, so two requests cannot each hold half and wait on each
other), keeps them while the processor turns the images into crops, and gives them back. Requests beyond
the budget wait their turn, first come first served; one that alone needs more than the budget is refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress


class PixelBudgetExceeded(ValueError):
    """One request needs more pixels than the whole budget."""


class PixelBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    def check(self, pixels: int) -> None:
        """Raise PixelBudgetExceeded when one request of this many pixels could never be held."""
        if pixels > self.total:
            raise PixelBudgetExceeded(
                f"the images have {pixels} pixels in total, more than the limit of {self.total}"
            )

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        if pixels == 0:  # nothing to hold: never queue behind others
            yield
            return
        self.check(pixels)
        await self._acquire(pixels)
        try:
            yield
        finally:
            self._release(pixels)

    async def _acquire(self, pixels: int) -> None:
        if not self._waiters and self.in_use + pixels <= self.total:
            self.in_use += pixels
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (pixels, turn)
        self._waiters.append(entry)
        try:
            await turn  # _grant has already counted these pixels as in use
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(pixels)  # granted just as the caller gave up
            else:
                with suppress(ValueError):  # _grant may have dropped the cancelled entry already
                    self._waiters.remove(entry)
                self._grant()  # the queue head may have changed
            raise

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            pixels, turn = self._waiters[0]
            if turn.done():  # cancelled while queued, its task not run yet
                self._waiters.popleft()
                continue
            if self.in_use + pixels > self.total:
                return
            self._waiters.popleft()
            self.in_use += pixels
            turn.set_result(None)
