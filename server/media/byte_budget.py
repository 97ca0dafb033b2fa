"""A cap on encoded media bytes held at once across every request: the images and videos fetched, read from
files or decoded from base64, from their arrival until the request's media are decoded (or refused).

The per-part byte caps bound one image or video, not how many arrive at once: 30 concurrent 60 MB video URLs held
3.7 GB while they queued for the video decoders. Bytes arrive a chunk at a time, so a request that would take the
total past the cap is refused at once with a 503 (retry later; a 400 when the request alone is past it) rather than
queued: requests each holding part of the budget and waiting for more could wait on each other for ever. Used from
the event loop only.
"""

from __future__ import annotations

from ..errors import APIError

DEFAULT_MEDIA_BYTES_IN_FLIGHT = 1024 * 1024 * 1024


class MediaBytesBudget:
    def __init__(self, total: int = DEFAULT_MEDIA_BYTES_IN_FLIGHT) -> None:
        self.total = total
        self.in_use = 0

    def hold(self) -> BytesHold:
        """A request's share, empty until it takes bytes; as a context manager, given back when the block ends."""
        return BytesHold(self)


class BytesHold:
    """The bytes one request holds; `release` gives them all back."""

    def __init__(self, budget: MediaBytesBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, count: int) -> None:
        budget = self.budget
        if self.held + count > budget.total:  # this request alone could never be held: no retry helps
            raise APIError(
                f"the request's images and videos are more than the {budget.total} bytes the server holds at once",
                400,
                param="messages",
            )
        if budget.in_use + count > budget.total:
            raise APIError(
                f"the server is holding its limit of {budget.total} bytes of images and videos for other "
                "requests; retry shortly",
                503,
            )
        budget.in_use += count
        self.held += count

    def release(self) -> None:
        self.budget.in_use -= self.held
        self.held = 0

    def __enter__(self) -> BytesHold:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
