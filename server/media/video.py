"""VideoLoader: `video_url` URLs -> the recipe's frames. Fetched under the media policy (the same address checks
as images; the video byte cap and download timeout), then read and decoded with PyAV (ovis2/video.py) in a
bounded pool of threads of its own, each step under --video-decode-timeout. A caller that is cancelled (its
client left) stops its thread at the next packet and waits for it, so nothing outlives its pixel-budget hold.

Two steps, so that the pixel budget can be taken between them (media_loader.py): `open` fetches the video and
reads its packets, nothing decoded, to know which frames it gives; `decode` decodes those frames."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from PIL import Image

from ..engine_api import (
    Ovis2Error,
    VideoLimits,
    VideoProbe,
    decode_video_frames,
    frames_for_fps,
    probe_video,
    sample_timestamps,
)
from .byte_budget import BytesHold
from .errors import MediaError
from .fetch import VIDEO, MediaFetcher
from .policy import MediaPolicy

VIDEO_ERROR = "invalid_video"


@dataclass(frozen=True)
class FrameRequest:
    """How many frames a request wants from each of its videos: `num_frames`, or with `fps` that many a second
    of video, `num_frames` at most."""

    num_frames: int
    fps: float | None = None


@dataclass
class OpenedVideo:
    """A fetched video whose packets were read: the timestamps of the frames it gives (not decoded yet)."""

    data: bytes
    probed: VideoProbe
    timestamps: list[int]

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.probed.width, self.probed.height

    @property
    def pixels(self) -> int:
        """Decoded pixels its frames hold (a frame on screen twice is decoded once)."""
        return len(set(self.timestamps)) * self.probed.width * self.probed.height

    def close(self) -> None:
        self.data = b""


@dataclass
class VideoLoader:
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    limits: VideoLimits = field(default_factory=VideoLimits)
    workers: int = 2
    transport: httpx.AsyncBaseTransport | None = None  # tests may inject one
    on_decoded: Callable[[float, int], None] | None = None  # (seconds, frames) of each decoded video: metrics

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ovis2-video")

    @classmethod
    def from_settings(cls, settings, policy: MediaPolicy, on_decoded=None) -> VideoLoader:
        limits = VideoLimits(
            max_bytes=settings.max_video_bytes,
            max_seconds=settings.max_video_seconds,
            max_stream_frames=settings.max_video_stream_frames,
            max_frame_pixels=settings.max_video_frame_pixels,
            timeout=settings.video_decode_timeout,
        )
        return cls(policy, limits, settings.video_decode_workers, on_decoded=on_decoded)

    async def open(
        self, url: str, frames: FrameRequest, param: str | None = None, hold: BytesHold | None = None
    ) -> OpenedVideo:
        """Fetched (its bytes taken into `hold`) and its packets read: the timestamps of the frames to decode."""
        try:
            data = await MediaFetcher(self.policy, self.transport, VIDEO, hold).read_bytes(url)
            probed = await self.in_pool(probe_video, data, self.limits)
            count = (
                frames.num_frames
                if frames.fps is None
                else frames_for_fps(probed.duration, frames.fps, frames.num_frames)
            )
            return OpenedVideo(data, probed, sample_timestamps(list(probed.timestamps), probed.end, count))
        except MediaError as exc:
            exc.param, exc.code = exc.param or param, VIDEO_ERROR
            raise
        except Ovis2Error as exc:
            raise MediaError(str(exc), param=param, code=VIDEO_ERROR) from exc

    async def decode(self, opened: OpenedVideo, param: str | None = None) -> list[Image.Image]:
        try:
            started = time.monotonic()
            sampled = await self.in_pool(
                decode_video_frames, opened.data, opened.probed, opened.timestamps, self.limits
            )
        except Ovis2Error as exc:
            raise MediaError(str(exc), param=param, code=VIDEO_ERROR) from exc
        if self.on_decoded is not None:
            self.on_decoded(time.monotonic() - started, len(sampled.frames))
        return sampled.frames

    async def in_pool(self, function, *args):
        """function(*args, stop=event) in the pool. A cancelled caller sets the event, and waits for a running
        thread to stop (a queued one never starts)."""
        stop = threading.Event()
        job = self.executor.submit(function, *args, stop=stop)
        done = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            if not job.cancel():
                await asyncio.wait([done])
            if done.done() and not done.cancelled():
                done.exception()  # the stopped thread's error is no one's: retrieved, so asyncio logs nothing
            raise

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
