"""Reading a video's container with PyAV (FFmpeg bundled) without decoding a pixel: the container and codec from
an allow-list, the frame size and declared duration from the header, then every frame's presentation timestamp
and the keyframes from the packets, with the duration and frame count limits checked while they are read;
truncated files and headers that misstate the duration are refused (`probe_video`).

The format is chosen from the file's first bytes and handed to FFmpeg, so FFmpeg never probes for one of its
other demuxers (a playlist "video" that makes FFmpeg open other files or URLs is the classic attack). Every
step checks a deadline (and an optional stop event) between packets. `import av` happens on first use.
"""

from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

from .errors import Ovis2Error
from .mp4_sample_tables import declared_index

CONTAINERS = {
    "mov": "mp4/mov",
    "matroska": "webm/mkv",
}  # the FFmpeg demuxers allowed, by the name given to it
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4")
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # what an mp4/mov file starts with
_EBML = b"\x1a\x45\xdf\xa3"  # what a webm/mkv file starts with
DURATION_SLACK_SECONDS, DURATION_SLACK_RATIO = 0.5, 0.1  # how far a declared duration may be from the frames'
# The index FFmpeg may build for an mp4/mov file, in entries over all its tracks: this many times max_stream_frames
# for the video, plus this many packets a second of max_seconds for the other tracks (AAC at 96 kHz: 94).
INDEX_ENTRIES_PER_FRAME, INDEX_ENTRIES_PER_SECOND = 4, 200
MAX_STREAMS = 64  # FFmpeg's max_streams: streams a file may open (its default is 1000)


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_seconds: float = 600.0
    max_stream_frames: int = 36_000  # frames in the container (10 minutes at 60 fps)
    max_frame_pixels: int = 3840 * 2160
    timeout: float = 20.0  # seconds for reading the packets, and again for decoding the frames


@dataclass(frozen=True)
class VideoProbe:
    container: str
    codec: str
    stream_index: int
    width: int
    height: int
    time_base: Fraction
    timestamps: tuple[int, ...]  # every frame's presentation timestamp, sorted
    keyframes: tuple[int, ...]  # the keyframes' timestamps, sorted
    end: int  # where the last frame stops showing

    @property
    def duration(self) -> float:
        return float((self.end - self.timestamps[0]) * self.time_base)

    def seconds(self, timestamp: int) -> float:
        return float(timestamp * self.time_base)


class Deadline:
    """Raises Ovis2Error once `seconds` have passed (or `stop` is set), checked between packets."""

    def __init__(self, seconds: float, what: str, stop: threading.Event | None = None) -> None:
        self.at, self.seconds, self.what, self.stop = time.monotonic() + seconds, seconds, what, stop

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Ovis2Error(f"{self.what} the video was cancelled")
        if time.monotonic() > self.at:
            raise Ovis2Error(f"{self.what} the video took longer than the limit of {self.seconds:g}s")


# ------------------------------------------------------------------------------------------------- probing


def sniff_container(data: bytes) -> str:
    """The FFmpeg demuxer for these bytes: 'mov' (mp4, mov) or 'matroska' (webm, mkv); anything else is refused."""
    if data[:4] == _EBML:
        return "matroska"
    if len(data) >= 8 and data[4:8] in _ISO_BOXES:
        return "mov"
    raise Ovis2Error("the video is not an mp4, mov, webm or mkv file")


def probe_video(
    data: bytes, limits: VideoLimits = VideoLimits(), stop: threading.Event | None = None
) -> VideoProbe:
    if not data:
        raise Ovis2Error("the video is empty")
    if len(data) > limits.max_bytes:
        raise Ovis2Error(f"the video is larger than {limits.max_bytes} bytes")
    deadline = Deadline(limits.timeout, "reading", stop)
    if sniff_container(data) == "mov":
        check_declared_samples(data, limits)
    with opened(data) as container:
        stream, codec = _video_stream(container)
        width, height = _checked_size(stream, limits)
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_seconds:
            raise Ovis2Error(
                f"the video is {declared:.1f}s long; at most {limits.max_seconds:g}s are allowed"
            )
        timestamps, keyframes, end = _read_packets(container, stream, limits, deadline)
        found = VideoProbe(
            container.format.name.split(",")[0],
            codec,
            stream.index,
            width,
            height,
            Fraction(stream.time_base),
            timestamps,
            keyframes,
            end,
        )
    _check_declared_duration(declared, found.duration)
    return found


@contextmanager
def opened(data: bytes):
    av = _av()
    demuxer = sniff_container(data)
    corrupt = f"the {CONTAINERS[demuxer]} video is corrupt or truncated"
    try:
        container = av.open(
            io.BytesIO(data), mode="r", format=demuxer, options={"max_streams": str(MAX_STREAMS)}
        )
    except Ovis2Error:
        raise
    except decode_errors() as exc:
        raise Ovis2Error(corrupt) from exc
    try:
        yield container
    except Ovis2Error:
        raise
    except decode_errors() as exc:
        raise Ovis2Error(corrupt) from exc
    finally:
        container.close()


def _video_stream(container) -> tuple:
    """(the first video stream, its codec's name), refused unless the codec is allowed."""
    if not container.streams.video:
        kinds = " and ".join(sorted({s.type for s in container.streams}))
        raise Ovis2Error("the file has no video stream" + (f" (only {kinds})" if kinds else ""))
    stream = container.streams.video[0]
    if stream.codec_context is None:  # FFmpeg found the track but could not set up its decoder
        raise Ovis2Error("the video is corrupt or its codec is unknown")
    codec = stream.codec_context.codec.canonical_name  # the codec's name (av1), not its decoder's (libdav1d)
    if codec not in CODECS:
        raise Ovis2Error(f"the video codec '{codec}' is not supported; use {', '.join(CODECS)}")
    return stream, codec


def check_declared_samples(data: bytes, limits: VideoLimits) -> None:
    """Refuse an mp4/mov file whose boxes declare a larger index than its limits allow, before FFmpeg builds it
    (mp4_sample_tables.py)."""
    entries = declared_index(data).index_entries
    limit = INDEX_ENTRIES_PER_FRAME * limits.max_stream_frames + int(
        INDEX_ENTRIES_PER_SECOND * limits.max_seconds
    )
    if entries > limit:
        raise Ovis2Error(
            f"the video's index declares {entries} entries (samples, audio chunks and edits over all its tracks); "
            f"at most {limit} are allowed"
        )


def _checked_size(stream, limits: VideoLimits) -> tuple[int, int]:
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width < 1 or height < 1:
        raise Ovis2Error("the video stream declares no frame size")
    if width * height > limits.max_frame_pixels:
        raise Ovis2Error(
            f"the video's frames are {width}x{height}, more than the limit of {limits.max_frame_pixels} "
            "pixels"
        )
    return width, height


def _declared_seconds(container, stream) -> float | None:
    """The duration the header states for the video stream (the container's when it holds only this stream)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _read_packets(container, stream, limits: VideoLimits, deadline: Deadline):
    """(sorted timestamps, sorted keyframe timestamps, end) from the packets; no frame is decoded."""
    stamps, keys, durations = set(), set(), {}
    seconds_per_tick, first = float(stream.time_base), None
    for packet in container.demux(stream):
        deadline.check()
        if packet.size == 0:  # the empty packet that ends the stream
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None or packet.is_corrupt:
            raise Ovis2Error("the video is corrupt or truncated: a frame has no timestamp or is damaged")
        stamps.add(stamp)
        first = stamp if first is None else min(first, stamp)
        durations[stamp] = packet.duration or 0
        if packet.is_keyframe:
            keys.add(stamp)
        if len(stamps) > limits.max_stream_frames:
            raise Ovis2Error(f"the video has more than {limits.max_stream_frames} frames")
        if (stamp - first) * seconds_per_tick > limits.max_seconds:
            raise Ovis2Error(f"the video is longer than the limit of {limits.max_seconds:g}s")
    if len(stamps) < (stream.frames or 0):  # mp4 lists its frames in the index
        raise Ovis2Error(f"the video is truncated: it lists {stream.frames} frames but holds {len(stamps)}")
    if not stamps:
        raise Ovis2Error("the video has no frames")
    ordered = sorted(stamps)
    last_step = durations[ordered[-1]] or (ordered[-1] - ordered[-2] if len(ordered) > 1 else 1)
    return tuple(ordered), tuple(sorted(keys)) or (ordered[0],), ordered[-1] + max(1, last_step)


def _check_declared_duration(declared: float | None, measured: float) -> None:
    if declared is None:
        return
    if abs(declared - measured) > max(DURATION_SLACK_SECONDS, DURATION_SLACK_RATIO * max(declared, measured)):
        raise Ovis2Error(
            f"the video declares {declared:.2f}s but its frames span {measured:.2f}s; the file is "
            "truncated or its header is wrong"
        )


def _av():
    try:
        import av
    except ImportError as exc:  # a declared dependency; only a broken install lacks it
        raise Ovis2Error("video input needs PyAV: pip install av") from exc
    return av


def decode_errors() -> tuple[type[BaseException], ...]:
    av = _av()
    return (av.error.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError)
