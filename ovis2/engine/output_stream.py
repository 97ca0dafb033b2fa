"""One request's outputs on their way from the engine's thread to the asyncio consumer of `AsyncEngine.generate`."""

from __future__ import annotations

import asyncio
from collections import deque

from .outputs import RequestOutput


class OutputStream:
    """One request's outputs on their way to its consumer. Outputs are cumulative except for their deltas, so
    those a slow consumer has not read yet merge into the newest: it holds one pending output, not one per step."""

    def __init__(self) -> None:
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if self._items and isinstance(item, RequestOutput) and isinstance(self._items[-1], RequestOutput):
            item = _merge(self._items.pop(), item)
        self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """newer, with older's deltas in front of its own."""
    for before, after in zip(older.outputs, newer.outputs, strict=True):
        after.delta_text = before.delta_text + after.delta_text
        after.delta_token_ids = before.delta_token_ids + after.delta_token_ids
        if after.delta_logprobs is not None:
            after.delta_logprobs = before.delta_logprobs + after.delta_logprobs
    return newer
