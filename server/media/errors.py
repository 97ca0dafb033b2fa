"""MediaError: a bad media URL or file, answered with a 400 that names the part it came from."""

from __future__ import annotations

from ..errors import APIError


class MediaError(APIError):
    """A bad image or video URL, image or video: a 400 naming the part it came from."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_image"):
        super().__init__(message, 400, param=param, code=code)
