"""Decoding the recipe's frames of a video with PyAV: only what the sampled frames need, from their keyframes
(seeking there), skipping the frames nothing refers to (video_probe.py reads the container first).

- `decode_video_frames(data, probed, timestamps, limits)`: the frames at those timestamps, as upright RGB PIL images.
- `load_video(source, num_frames, fps, limits)`: probe and decode a path or bytes, or sample a list of frames
  (`LLM.chat`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import Ovis2Error
from .image_processing import to_pil_image
from .video_probe import Deadline, VideoLimits, VideoProbe, decode_errors, opened, probe_video
from .video_sampling import RECIPE_NUM_FRAMES, frames_for_fps, sample_indices, sample_timestamps

# Codecs whose FFmpeg decoder takes skip_frame packet by packet; libdav1d (AV1) reads it once, when it starts, and
# then hands out a neighbour's pixels under a frame's timestamp, so AV1 decodes every frame.
SKIPS_NON_REFERENCE_FRAMES = ("h264", "hevc", "mpeg4", "vp8", "vp9")
CODED_SIZE_SLACK = 128  # pixels a decoder's coded width or height may add to the displayed one


@dataclass
class SampledVideo:
    frames: list[Image.Image]
    timestamps: list[float]  # seconds on the container's clock; positions in the list for a list of frames
    num_decoded: int = 0  # frames the decoder produced to reach them (all of the video's when nothing seeks)


# ------------------------------------------------------------------------------------------------ decoding


def decode_video_frames(
    data: bytes,
    probed: VideoProbe,
    timestamps: list[int],
    limits: VideoLimits = VideoLimits(),
    stop: threading.Event | None = None,
) -> SampledVideo:
    """The frames at `timestamps` (from `probed.timestamps`), decoded from the keyframe before each, seeking
    forward when the next one starts past what has been decoded. Frames no other frame refers to are skipped
    unless wanted (the decoder's skip_frame), which changes no pixel of the frames that are decoded."""
    deadline = Deadline(limits.timeout, "decoding", stop)
    found: dict[int, Image.Image] = {}
    wanted = set(timestamps)
    skippable = (lambda stamp: stamp not in wanted) if probed.codec in SKIPS_NON_REFERENCE_FRAMES else None
    frames, last, decoded = None, None, 0
    with opened(data) as container:
        stream = container.streams[probed.stream_index]
        stream.thread_type = "SLICE"  # frame threads only add latency to the few frames after each seek
        # the header's frame size was checked, but a keyframe may switch to a larger one: the decoder refuses one
        # past the limit before it allocates it (one that grows within it is refused below, once decoded)
        stream.codec_context.options = {"max_pixels": str(_decoder_pixel_cap(probed, limits))}
        try:
            for target in sorted(wanted):
                keyframe = _keyframe_before(probed.keyframes, target)
                if frames is None:  # the first: no seek when it lies in the first group of pictures
                    if keyframe > probed.timestamps[0]:
                        _seek(container, stream, keyframe)
                    frames = _frames(container, stream, skippable, deadline)
                # its group starts past what is decoded
                elif keyframe > last and _seek(container, stream, keyframe):
                    frames = _frames(container, stream, skippable, deadline)
                frame, count = _decode_until(frames, target, probed)
                decoded += count
                last, found[target] = frame.pts, _upright(frame)
        except Ovis2Error:
            raise
        except decode_errors() as exc:
            raise Ovis2Error(
                "the video cannot be decoded: it is corrupt, or a frame is larger than the limit of "
                f"{limits.max_frame_pixels} pixels"
            ) from exc
    return SampledVideo([found[t] for t in timestamps], [probed.seconds(t) for t in timestamps], decoded)


def _decoder_pixel_cap(probed: VideoProbe, limits: VideoLimits) -> int:
    """The limit, with room for the coded size FFmpeg holds max_pixels against: decoders round the displayed
    size up (to 16, 32 or 64; a 2160x3840 frame is coded 2176 wide), so the limit alone refused frames at it."""
    slack = CODED_SIZE_SLACK
    return limits.max_frame_pixels + slack * (probed.width + probed.height) + slack * slack


def _keyframe_before(keyframes: tuple[int, ...], target: int) -> int:
    earlier = [k for k in keyframes if k <= target]
    return earlier[-1] if earlier else keyframes[0]


def _seek(container, stream, keyframe: int) -> bool:
    """Seek to the keyframe; False when the file cannot seek (the frames wanted come in increasing order, so
    decoding on forward reaches them too, only slower)."""
    try:
        container.seek(keyframe, stream=stream, backward=True, any_frame=False)
    except decode_errors():
        return False
    return True


def _frames(container, stream, skippable: Callable[[int], bool] | None, deadline: Deadline) -> Iterator:
    """The stream's frames decoded from where the demuxer is, but for those no frame refers to that are
    `skippable` (by timestamp; None: none)."""
    context = stream.codec_context
    for packet in container.demux(stream):
        deadline.check()
        if skippable is not None:
            stamp = packet.pts if packet.pts is not None else packet.dts
            context.skip_frame = "NONREF" if skippable(stamp) else "DEFAULT"
        yield from packet.decode()


def _decode_until(frames: Iterator, target: int, probed: VideoProbe):
    """(the first decoded frame at or after `target`, frames decoded to reach it)."""
    count = 0
    for frame in frames:
        count += 1
        # the header's size is what memory and tokens were counted for
        if frame.width * frame.height > probed.width * probed.height:
            raise Ovis2Error(
                f"the video's frames grow from the {probed.width}x{probed.height} its header declares to "
                f"{frame.width}x{frame.height}"
            )
        if frame.pts is not None and frame.pts >= target:
            return frame, count
    raise Ovis2Error(
        f"the video ends before its frame at {probed.seconds(target):.2f}s; the file is corrupt or truncated"
    )


def _upright(frame) -> Image.Image:
    """The frame as RGB, turned as its display matrix says (phones store portrait video turned)."""
    image = frame.to_image()
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    return image.rotate(rotation, expand=True) if rotation in (90, 180, 270) else image


# ------------------------------------------------------------------------------------------------- sources


def load_video(
    source, num_frames: int = RECIPE_NUM_FRAMES, fps: float | None = None, limits: VideoLimits = VideoLimits()
) -> SampledVideo:
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
    return decode_video_frames(
        data, probed, sample_timestamps(list(probed.timestamps), probed.end, count), limits
    )


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
