"""Small asyncio helpers the server shares: waiting out tasks and threads when the caller is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_even_if_cancelled(tasks) -> None:
    """Wait until every task is done; a cancellation of the caller is passed on only after that."""
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        await asyncio.wait(tasks)
        raise


async def finish_in_thread(function, *args):
    """function(*args) in a thread, which a cancellation of the caller waits for (so that what the thread uses,
    such as decoded images under the pixel budget, is not released under it)."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    await wait_even_if_cancelled([task])
    return task.result()


def results_or_first_error(tasks: list[asyncio.Future], discard: Callable[[T], object]) -> list[T]:
    """The results of the (finished) tasks, in order. If any task failed or was cancelled, `discard` is called on
    each result that was made and the first failure in task order is raised (CancelledError if none failed)."""
    ran = [task for task in tasks if not task.cancelled()]
    results = [task.result() for task in ran if task.exception() is None]
    errors = [task.exception() for task in ran if task.exception() is not None]
    if errors or len(results) < len(tasks):
        for result in results:
            discard(result)
        raise errors[0] if errors else asyncio.CancelledError()
    return results
