"""Video decoding with PyAV (FFmpeg bundled): containers and codecs from an allow-list, limits checked from the
header and while the packets are read, and only the sampled frames decoded, seeking to their keyframes.

- `probe_video(data, limits)`: the container's packets read without decoding a pixel: every frame's presentation
  timestamp, the keyframes, the frame size; the duration, frame count and size limits; truncated files and
  headers that misstate the duration are refused.
- `decode_video_frames(data, probed, timestamps, limits)`: the frames at those timestamps, as upright RGB PIL images.
- `load_video(source, num_frames, fps, limits)`: both, for a path, bytes or a list of frames (`LLM.chat`).

The format is chosen from the file's first bytes and handed to FFmpeg, so FFmpeg never probes for one of its
other demuxers (a playlist "video" that makes FFmpeg open other files or URLs is the classic attack). Every
step checks a deadline (and an optional stop event) between packets. `import av` happens on first use.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from .errors import Ovis2Error
from .image_processing import to_pil_image
from .video_sampling import RECIPE_NUM_FRAMES, frames_for_fps, sample_indices, sample_timestamps

CONTAINERS = {"mov": "mp4/mov", "matroska": "webm/mkv"}  # the FFmpeg demuxers allowed, by the name given to it
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4")
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # what an mp4/mov file starts with
_EBML = b"\x1a\x45\xdf\xa3"  # what a webm/mkv file starts with
DURATION_SLACK_SECONDS, DURATION_SLACK_RATIO = 0.5, 0.1  # how far a declared duration may be from the frames'


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


@dataclass
class SampledVideo:
    frames: list[Image.Image]
    timestamps: list[float]  # seconds on the container's clock; positions in the list for a list of frames
    num_decoded: int = 0  # frames the decoder produced to reach them (all of the video's when nothing seeks)


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


def probe_video(data: bytes, limits: VideoLimits = VideoLimits(), stop: threading.Event | None = None) -> VideoProbe:
    if not data:
        raise Ovis2Error("the video is empty")
    if len(data) > limits.max_bytes:
        raise Ovis2Error(f"the video is larger than {limits.max_bytes} bytes")
    deadline = Deadline(limits.timeout, "reading", stop)
    with _opened(data) as container:
        stream = _video_stream(container)
        width, height = _checked_size(stream, limits)
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_seconds:
            raise Ovis2Error(f"the video is {declared:.1f}s long; at most {limits.max_seconds:g}s are allowed")
        timestamps, keyframes, end = _read_packets(container, stream, limits, deadline)
        found = VideoProbe(container.format.name.split(",")[0], stream.codec_context.name, stream.index, width,
                           height, Fraction(stream.time_base), timestamps, keyframes, end)  # fmt: skip
    _check_declared_duration(declared, found.duration)
    return found


@contextmanager
def _opened(data: bytes):
    av = _av()
    demuxer = sniff_container(data)
    corrupt = f"the {CONTAINERS[demuxer]} video is corrupt or truncated"
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except Ovis2Error:
        raise
    except _decode_errors() as exc:
        raise Ovis2Error(corrupt) from exc
    try:
        yield container
    except Ovis2Error:
        raise
    except _decode_errors() as exc:
        raise Ovis2Error(corrupt) from exc
    finally:
        container.close()


def _video_stream(container):
    if not container.streams.video:
        kinds = " and ".join(sorted({s.type for s in container.streams}))
        raise Ovis2Error("the file has no video stream" + (f" (only {kinds})" if kinds else ""))
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in CODECS:
        raise Ovis2Error(f"the video codec '{codec}' is not supported; use {', '.join(CODECS)}")
    return stream


def _checked_size(stream, limits: VideoLimits) -> tuple[int, int]:
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width < 1 or height < 1:
        raise Ovis2Error("the video stream declares no frame size")
    if width * height > limits.max_frame_pixels:
        raise Ovis2Error(f"the video's frames are {width}x{height}, more than the limit of {limits.max_frame_pixels} "
                         "pixels")  # fmt: skip
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
        raise Ovis2Error(f"the video declares {declared:.2f}s but its frames span {measured:.2f}s; the file is "
                         "truncated or its header is wrong")  # fmt: skip


# ------------------------------------------------------------------------------------------------ decoding


def decode_video_frames(data: bytes, probed: VideoProbe, timestamps: list[int], limits: VideoLimits = VideoLimits(),
                  stop: threading.Event | None = None) -> SampledVideo:  # fmt: skip
    """The frames at `timestamps` (from `probed.timestamps`), decoded from the keyframe before each, seeking
    forward when the next one starts past what has been decoded."""
    deadline = Deadline(limits.timeout, "decoding", stop)
    found: dict[int, Image.Image] = {}
    frames, last, decoded = None, None, 0
    with _opened(data) as container:
        stream = container.streams[probed.stream_index]
        stream.thread_type = "SLICE"  # frame threads only add latency to the few frames after each seek
        for target in sorted(set(timestamps)):
            keyframe = _keyframe_before(probed.keyframes, target)
            if frames is None:  # the first: no seek when it lies in the first group of pictures
                if keyframe > probed.timestamps[0]:
                    _seek(container, stream, keyframe)
                frames = _frames(container, stream, deadline)
            elif keyframe > last and _seek(container, stream, keyframe):  # its group starts past what is decoded
                frames = _frames(container, stream, deadline)
            frame, count = _decode_until(frames, target, probed)
            decoded += count
            last, found[target] = frame.pts, _upright(frame)
    return SampledVideo([found[t] for t in timestamps], [probed.seconds(t) for t in timestamps], decoded)


def _keyframe_before(keyframes: tuple[int, ...], target: int) -> int:
    earlier = [k for k in keyframes if k <= target]
    return earlier[-1] if earlier else keyframes[0]


def _seek(container, stream, keyframe: int) -> bool:
    """Seek to the keyframe; False when the file cannot seek (the frames wanted come in increasing order, so
    decoding on forward reaches them too, only slower)."""
    try:
        container.seek(keyframe, stream=stream, backward=True, any_frame=False)
    except _decode_errors():
        return False
    return True


def _frames(container, stream, deadline: Deadline) -> Iterator:
    """The stream's frames decoded from where the demuxer is."""
    for packet in container.demux(stream):
        deadline.check()
        yield from packet.decode()


def _decode_until(frames: Iterator, target: int, probed: VideoProbe):
    """(the first decoded frame at or after `target`, frames decoded to reach it)."""
    count = 0
    for frame in frames:
        count += 1
        if frame.pts is not None and frame.pts >= target:
            return frame, count
    raise Ovis2Error(f"the video ends before its frame at {probed.seconds(target):.2f}s; the file is corrupt or "
                     "truncated")  # fmt: skip


def _upright(frame) -> Image.Image:
    """The frame as RGB, turned as its display matrix says (phones store portrait video turned)."""
    image = frame.to_image()
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    return image.rotate(rotation, expand=True) if rotation in (90, 180, 270) else image


# ------------------------------------------------------------------------------------------------- sources


def load_video(source, num_frames: int = RECIPE_NUM_FRAMES, fps: float | None = None,
               limits: VideoLimits = VideoLimits()) -> SampledVideo:  # fmt: skip
    """The recipe's frames of a video file (path or bytes) or of a list of frames (PIL images or arrays).

    `num_frames` frames at the midpoints of equal intervals (video_sampling.py); with `fps`, that many frames per
    second of the video, `num_frames` at most."""
    if isinstance(source, (list, tuple)):
        if fps is not None:
            raise Ovis2Error("fps needs a video file; a list of frames has no clock (give num_frames)")
        if not source:
            raise Ovis2Error("the list of video frames is empty")
        indices = sample_indices(len(source), num_frames)
        return SampledVideo([to_pil_image(source[i]) for i in indices], [float(i) for i in indices])
    data = read_source(source, limits.max_bytes)
    probed = probe_video(data, limits)
    count = num_frames if fps is None else frames_for_fps(probed.duration, fps, num_frames)
    return decode_video_frames(data, probed, sample_timestamps(list(probed.timestamps), probed.end, count), limits)


def read_source(source, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as file:
                data = file.read(max_bytes + 1)
        except OSError as exc:
            raise Ovis2Error(f"cannot read the video file {str(source)!r}: {exc.strerror}") from exc
        if len(data) > max_bytes:
            raise Ovis2Error(f"the video is larger than {max_bytes} bytes")
        return data
    raise Ovis2Error(f"a video must be a path, bytes or a list of frames, not {type(source).__name__}")


def _av():
    try:
        import av
    except ImportError as exc:  # a declared dependency; only a broken install lacks it
        raise Ovis2Error("video input needs PyAV: pip install av") from exc
    return av


def _decode_errors() -> tuple[type[BaseException], ...]:
    av = _av()
    return (av.error.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError)
