"""Tiny test videos made with PyAV (bundled FFmpeg: libx264, libx265, libvpx, libvpx-vp9, libsvtav1 and mpeg4
encode here), good and bad.

Frame i of a `gray_frames` video is flat gray at level `level(i)`, so a decoded frame tells which one it is
(`frame_index`) whatever the codec did to it. Every maker returns the file's bytes.
"""

from __future__ import annotations

import io
import struct
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

SIZE = (64, 48)
STEP, BASE = 5, 20  # gray levels 20, 25, 30, ...: at most 47 frames


def level(index: int) -> int:
    return BASE + STEP * index


def frame_index(image: Image.Image) -> int:
    """Which gray frame a decoded image is (its mean level, rounded to the nearest step)."""
    return round((float(np.asarray(image.convert("L")).mean()) - BASE) / STEP)


def gray(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.full((size[1], size[0], 3), level(index), np.uint8)


def encode(
    frames,
    codec: str = "libx264",
    container: str = "mp4",
    fps: int = 10,
    pts=None,
    size: tuple[int, int] = SIZE,
    options: dict | None = None,
    rotation: int | None = None,
    container_options: dict | None = None,
) -> bytes:
    """`frames` (HxWx3 uint8 arrays) as a video; `pts` in 1/1000 s gives a variable frame rate."""
    with tempfile.TemporaryDirectory() as folder:  # a file: +faststart rewrites it by name
        path = Path(folder) / f"video.{container}"
        _write(path, frames, codec, container, fps, pts, size, options, rotation, container_options)
        return path.read_bytes()


def _write(path, frames, codec, container, fps, pts, size, options, rotation, container_options) -> None:
    with av.open(str(path), "w", format=container, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = (
            {"preset": "ultrafast"} if codec == "libx264" and options is None else (options or {})
        )
        if codec == "mpeg4":
            stream.bit_rate = 2_000_000  # its default quality blurs neighbouring gray levels into each other
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def gray_video(count: int, codec: str = "libx264", container: str = "mp4", **kwargs) -> bytes:
    return encode([gray(i, kwargs.get("size", SIZE)) for i in range(count)], codec, container, **kwargs)


def no_frames() -> bytes:
    """A matroska file with an h264 video stream that holds not one frame (and an audio stream that has some)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        video = out.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = *SIZE, "yuv420p"
        _mux_silence(out, out.add_stream("aac", rate=16000))
    return buffer.getvalue()


def audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        _mux_silence(out, out.add_stream("aac", rate=16000))
    return buffer.getvalue()


def _mux_silence(out, stream, count: int = 8) -> None:
    for i in range(count):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def mp4_declaring(data: bytes, factor: float) -> bytes:
    """The mp4 with the durations its mvhd, tkhd, mdhd and elst boxes declare multiplied by `factor`; its frames
    and their timestamps unchanged (FFmpeg reads the shorter of the declared and the indexed duration)."""
    patched = bytearray(data)
    for box, offset in ((b"mvhd", 16), (b"tkhd", 20), (b"mdhd", 16), (b"elst", 8)):  # version-0 fields
        at = patched.find(box)
        if at != -1:
            field = at + 4 + offset
            (value,) = struct.unpack(">I", patched[field : field + 4])
            patched[field : field + 4] = struct.pack(">I", max(1, int(value * factor)))
    return bytes(patched)


def webm_declaring(data: bytes, milliseconds: float) -> bytes:
    """The webm with its Segment Duration element (ID 0x4489, an 8-byte float) set to `milliseconds`."""
    at = data.find(b"\x44\x89\x88") + 3
    assert at > 2, "no 8-byte Duration element"
    return data[:at] + struct.pack(">d", milliseconds) + data[at + 8 :]


def faststart(count: int = 20) -> bytes:
    """An h264 mp4 with its index (moov) before the frames, so that a cut keeps the index and loses frames."""
    return gray_video(count, container_options={"movflags": "+faststart"})


def index_bomb(samples: int) -> bytes:
    """The h264 mp4 with its sample table rewritten in place to declare `samples` samples of one constant size
    in each chunk (stsz, stsc): a few bytes that make FFmpeg build an index entry per declared sample."""
    patched = bytearray(gray_video(20))
    stsz = patched.find(b"stsz") + 4  # body: version/flags, sample_size, sample_count, [sizes]
    struct.pack_into(">II", patched, stsz + 4, 16, samples)
    stsc = (
        patched.find(b"stsc") + 4
    )  # body: version/flags, entry_count, (first_chunk, samples_per_chunk, id)...
    struct.pack_into(">I", patched, stsc + 12, samples)
    return bytes(patched)


def fragment_bomb(samples: int) -> bytes:
    """A fragmented h264 mp4 whose first fragment's trun declares `samples` samples."""
    patched = bytearray(gray_video(20, container_options={"movflags": "frag_keyframe+empty_moov"}))
    trun = patched.find(b"trun") + 4  # body: version/flags, sample_count, ...
    struct.pack_into(">I", patched, trun + 4, samples)
    return bytes(patched)


def growing(big: tuple[int, int] = (128, 96), count: int = 4) -> bytes:
    """A vp9 webm whose header and first `count` frames are SIZE, then `count` frames of `big` (a vp9 keyframe
    carries its own size, so a stream may switch)."""
    buffer = io.BytesIO()
    options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    with av.open(buffer, "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.options = *SIZE, "yuv420p", options
        _encode_into(out, stream, stream, [gray(i) for i in range(count)], 0)
        larger = av.CodecContext.create("libvpx-vp9", "w")
        larger.width, larger.height, larger.pix_fmt, larger.options = *big, "yuv420p", options
        larger.time_base, larger.framerate = Fraction(1, 10), 10
        _encode_into(out, stream, larger, [gray(count + i, big) for i in range(count)], count)
    return buffer.getvalue()


def _encode_into(out, stream, encoder, frames: list, first_pts: int) -> None:
    def mux(packets) -> None:
        for packet in packets:
            packet.stream, packet.pts, packet.dts = stream, first_pts + packet.pts, first_pts + packet.pts
            out.mux(packet)

    for i, array in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(array, format="rgb24")
        frame.pts = i
        mux(encoder.encode(frame))
    mux(encoder.encode())


def with_pcm_audio(seconds: int, rate: int = 8000) -> bytes:
    """A mov of `seconds` one-per-second h264 frames and as long a track of 16-bit PCM audio, whose sample table
    declares one sample per audio sample (FFmpeg indexes such audio by chunk)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video.mov"
        with av.open(str(path), "w", format="mov") as out:
            video = out.add_stream("libx264", rate=1)
            video.width, video.height, video.pix_fmt, video.options = (
                *SIZE,
                "yuv420p",
                {"preset": "ultrafast"},
            )
            audio = out.add_stream("pcm_s16le", rate=rate, layout="mono")
            for second in range(seconds):
                for packet in video.encode(av.VideoFrame.from_ndarray(gray(second % 40), format="rgb24")):
                    out.mux(packet)
                samples = av.AudioFrame.from_ndarray(
                    np.zeros((1, rate), np.int16), format="s16", layout="mono"
                )
                samples.sample_rate, samples.pts = rate, second * rate
                for packet in audio.encode(samples):
                    out.mux(packet)
            for stream in (video, audio):
                for packet in stream.encode():
                    out.mux(packet)
        return path.read_bytes()


class VideoSet:
    """The test videos, each made on first use and kept (a session fixture holds one VideoSet)."""

    def __init__(self) -> None:
        self._made: dict[str, bytes] = {}

    def __getattr__(self, name: str) -> bytes:
        if name.startswith("_") or name not in MAKERS:
            raise AttributeError(name)
        if name not in self._made:
            self._made[name] = MAKERS[name]()
        return self._made[name]


VFR_PTS = [
    0,
    100,
    200,
    300,
    400,
    2000,
    2100,
    2200,
    5000,
    5100,
]  # milliseconds: bursts and long still stretches
MAKERS = {
    "h264": lambda: gray_video(24, "libx264", "mp4"),
    "vp9": lambda: gray_video(24, "libvpx-vp9", "webm"),
    "mpeg4": lambda: gray_video(24, "mpeg4", "mp4"),
    "h264_mkv": lambda: gray_video(24, "libx264", "matroska"),
    "bframes": lambda: gray_video(
        30, options={"preset": "medium"}
    ),  # x264's B-frames: decode order != display
    "gop5": lambda: gray_video(40, options={"preset": "ultrafast", "g": "5"}),  # a keyframe every 5 frames
    "one_frame": lambda: gray_video(1),
    "vfr": lambda: encode([gray(i) for i in range(len(VFR_PTS))], pts=VFR_PTS),
    "rotated": lambda: encode([np.concatenate([gray(0), gray(40)], axis=1)], size=(128, 48), rotation=90),
    "audio_only": audio_only,
    "no_frames": no_frames,
    "mjpeg_mkv": lambda: gray_video(4, "mjpeg", "matroska"),
    "h264_ts": lambda: gray_video(4, "libx264", "mpegts"),
    "truncated": lambda: gray_video(20)[:1500],  # the index (at the end) is lost
    "truncated_frames": lambda: faststart()[:-400],  # the index is kept, the last frames are lost
    "claims_longer": lambda: webm_declaring(gray_video(20, "libvpx-vp9", "webm"), 200_000.0),
    "claims_shorter": lambda: mp4_declaring(gray_video(20), 0.1),
    "not_a_video": lambda: b"GIF89a, or any other file: " + bytes(range(256)),
    "hevc": lambda: gray_video(24, "libx265", "mp4", options={"preset": "ultrafast", "crf": "10"}),
    "vp8": lambda: gray_video(24, "libvpx", "webm"),
    "av1": lambda: gray_video(24, "libsvtav1", "mp4", options={"preset": "12", "crf": "10"}),
    "index_cut": lambda: faststart()[: faststart().find(b"stsd")],  # the track's sample description is lost
    "index_bomb": lambda: index_bomb(3_000_000),
    "index_bomb_as_hoov": lambda: index_bomb(3_000_000).replace(
        b"moov", b"hoov", 1
    ),  # FFmpeg reads it as moov
    "index_bomb_in_udta": lambda: index_bomb(3_000_000).replace(b"stbl", b"udta", 1),  # and tables anywhere
    "fragment_bomb": lambda: fragment_bomb(3_000_000),
    "growing": growing,
    "growing_far": lambda: growing((640, 480)),
    "pcm_audio": lambda: with_pcm_audio(20),
}
