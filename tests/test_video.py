"""Video decoding (ovis2/video.py) on tiny videos made with PyAV: the frames picked against an independent
computation from the container's own timestamps, seeking, and every kind of bad file refused with Ovis2Error."""

from __future__ import annotations

import io
import struct
import threading
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from ovis2.errors import Ovis2Error
from ovis2.video import decode_video_frames, load_video
from ovis2.video_probe import VideoLimits, probe_video, sniff_container
from tests.test_video_sampling import model_card_indices
from tests.videos import VFR_PTS, frame_index, gray, gray_video


def every_frame(data: bytes) -> tuple[list[Fraction], list[np.ndarray], Fraction]:
    """(presentation times, pixels, end of the last frame) of every frame, decoded in order with plain PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sorted(container.decode(stream), key=lambda frame: frame.pts)
        times = [frame.pts * stream.time_base for frame in frames]
        pixels = [frame.to_ndarray(format="rgb24") for frame in frames]
        step = frames[-1].duration or (frames[-1].pts - frames[-2].pts)
        return times, pixels, (frames[-1].pts + step) * stream.time_base


@pytest.mark.parametrize(
    "name", ["h264", "hevc", "vp8", "vp9", "mpeg4", "av1", "h264_mkv", "bframes", "gop5"]
)
@pytest.mark.parametrize("num_frames", [12, 5, 1])
def test_constant_rate_frames_are_the_model_cards_frames_of_the_container(videos, name, num_frames):
    data = getattr(videos, name)
    times, pixels, _ = every_frame(data)
    expected = model_card_indices(len(times), num_frames)
    sampled = load_video(data, num_frames)
    assert sampled.timestamps == [float(times[i]) for i in expected]
    for image, index in zip(sampled.frames, expected, strict=True):
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels[index])
        assert frame_index(image) == index  # and it is the frame that was encoded there


def test_variable_rate_frames_are_those_on_screen_at_evenly_spaced_times(videos):
    times, pixels, end = every_frame(videos.vfr)
    assert [int(t * 1000) for t in times] == VFR_PTS  # the container kept the irregular clock
    sampled = load_video(videos.vfr, 4)
    expected = []
    for index in model_card_indices(len(times), 4):
        moment = times[0] + (end - times[0]) * index / len(times)
        expected.append(max(k for k, t in enumerate(times) if t <= moment))
    assert sampled.timestamps == [float(times[k]) for k in expected]
    assert [frame_index(f) for f in sampled.frames] == expected
    assert load_video(videos.vfr, 12).timestamps == [float(t) for t in times]  # 10 frames: all of them


def test_seeking_skips_the_groups_of_pictures_between_the_frames(videos):
    probed = probe_video(videos.gop5)
    assert len(probed.keyframes) == 8 and len(probed.timestamps) == 40
    sampled = load_video(videos.gop5, 4)
    assert [frame_index(f) for f in sampled.frames] == model_card_indices(40, 4)
    assert sampled.num_decoded < 40 // 2  # each frame is decoded from its own keyframe, not from the start
    assert load_video(videos.h264, 12).num_decoded == 24  # one group of pictures: decoded straight through


def test_a_one_frame_video_works(videos):
    sampled = load_video(videos.one_frame)
    assert len(sampled.frames) == 1 and sampled.timestamps == [0.0] and frame_index(sampled.frames[0]) == 0
    assert probe_video(videos.one_frame).duration == pytest.approx(0.1)


def test_a_rotated_video_is_turned_upright(videos):
    (frame,) = load_video(videos.rotated).frames
    assert frame.size == (48, 128)  # stored 128x48, shown turned a quarter counter-clockwise
    pixels = np.asarray(frame.convert("L"), dtype=float)
    assert pixels[:64].mean() > pixels[64:].mean() + 100  # the bright right half is now on top


def test_paths_bytes_and_frame_lists(videos, tmp_path):
    path = tmp_path / "clip.webm"
    path.write_bytes(videos.vp9)
    assert (
        load_video(path).timestamps == load_video(str(path)).timestamps == load_video(videos.vp9).timestamps
    )
    frames = [Image.fromarray(gray(i)) for i in range(30)]
    listed = load_video(frames, 12)
    assert [frame_index(f) for f in listed.frames] == model_card_indices(30, 12)
    assert load_video([gray(0)], 12).frames[0].size == (64, 48)  # arrays work too
    with pytest.raises(Ovis2Error, match="fps needs a video file"):
        load_video(frames, 12, fps=1.0)
    with pytest.raises(Ovis2Error, match="cannot read"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(Ovis2Error, match="path, bytes or a list"):
        load_video(12)


def test_fps_asks_frames_per_second_of_the_video(videos):
    assert len(load_video(videos.vp9, 12, fps=2.0).frames) == 5  # 2.4 s at 2 fps
    assert len(load_video(videos.vp9, 3, fps=100.0).frames) == 3  # num_frames caps it
    assert len(load_video(videos.one_frame, 12, fps=0.01).frames) == 1


BAD_VIDEOS = {
    "audio_only": r"no video stream \(only audio\)",
    "no_frames": "has no frames",
    "mjpeg_mkv": "codec 'mjpeg' is not supported",
    "h264_ts": "not an mp4, mov, webm or mkv file",
    "not_a_video": "not an mp4, mov, webm or mkv file",
    "truncated": "corrupt or truncated",
    "truncated_frames": "corrupt or truncated",
    "claims_longer": "declares 200.00s but its frames span 2.00s",
    "claims_shorter": "declares 0.20s but its frames span 2.00s",
    "index_cut": "corrupt or its codec is unknown",
    "index_bomb": r"index declares 3000000 entries \(samples, audio chunks and edits over all its tracks\); at most 264000",
    "fragment_bomb": r"index declares 3000000 entries \(samples, audio chunks and edits over all its tracks\); at most 264000",
    "index_bomb_as_hoov": r"index declares 3000000 entries",
    "index_bomb_in_udta": r"index declares 3000000 entries",
    "growing": "frames grow from the 64x48 its header declares to 128x96",
}


@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
def test_bad_videos_are_refused(videos, name):
    with pytest.raises(Ovis2Error, match=BAD_VIDEOS[name]):
        load_video(getattr(videos, name))


@pytest.mark.parametrize("name", ["index_bomb", "fragment_bomb", "index_bomb_as_hoov", "index_bomb_in_udta"])
def test_an_index_declaring_millions_of_samples_is_refused_before_ffmpeg_opens_it(videos, name, monkeypatch):
    from ovis2 import video_probe

    def never(data):
        raise AssertionError("FFmpeg was given the file")

    monkeypatch.setattr(video_probe, "opened", never)
    with pytest.raises(Ovis2Error, match="index declares 3000000 entries"):
        probe_video(getattr(videos, name))


def test_uncompressed_audio_counts_its_chunks_not_its_samples(videos):
    """PCM's table declares a sample per audio sample, but FFmpeg indexes it by chunk: its chunks count, a chunk
    claiming millions of samples as the 1024-sample pieces FFmpeg would cut it into."""
    assert len(load_video(videos.pcm_audio, 4).frames) == 4
    patched = bytearray(videos.pcm_audio)
    audio_stsz = patched.find(b"stsz", patched.find(b"stsz") + 4) + 4
    struct.pack_into(">I", patched, audio_stsz + 8, 300_000_000)  # the sample count plays no part
    assert len(load_video(bytes(patched), 4).frames) == 4
    audio_stsc = patched.find(b"stsc", patched.find(b"stsc") + 4) + 4
    struct.pack_into(">I", patched, audio_stsc + 12, 2_000_000_000)  # the first entry's samples_per_chunk
    with pytest.raises(Ovis2Error, match="index declares"):
        probe_video(bytes(patched))


def test_a_frame_past_the_pixel_limit_is_refused_by_the_decoder(videos):
    """The header's 64x48 passes the limit; the decoder refuses the 640x480 frames before it allocates them."""
    limits = VideoLimits(max_frame_pixels=64 * 48 * 2)
    probed = probe_video(videos.growing_far, limits)
    with pytest.raises(Ovis2Error, match="a frame is larger than the limit of 6144 pixels"):
        decode_video_frames(videos.growing_far, probed, list(probed.timestamps), limits)


@pytest.mark.parametrize("size", [(100, 60), (60, 100)])
def test_frames_exactly_at_the_pixel_limit_decode_whatever_their_coded_size(size):
    """Decoders round the coded size up (100 -> 112 or 128): the limit holds the displayed size."""
    limits = VideoLimits(max_frame_pixels=size[0] * size[1])
    frames = load_video(gray_video(4, size=size), 2, limits=limits).frames
    assert [frame.size for frame in frames] == [size, size]


def test_empty_bytes_are_refused():
    with pytest.raises(Ovis2Error, match="empty"):
        load_video(b"")
    with pytest.raises(Ovis2Error, match="not an mp4"):
        sniff_container(b"\x00\x00\x00\x18ftyx")


@pytest.mark.parametrize(
    "limits, message",
    [
        (VideoLimits(max_bytes=1000), "larger than 1000 bytes"),
        (VideoLimits(max_seconds=1.0), "longer than the limit of 1s|is 2.4s long"),
        (VideoLimits(max_stream_frames=10), "more than 10 frames"),
        (VideoLimits(max_frame_pixels=64 * 48 - 1), "64x48, more than the limit of 3071 pixels"),
        (VideoLimits(timeout=0.0), "took longer than the limit of 0s"),
    ],
)
def test_limits(videos, limits, message):
    with pytest.raises(Ovis2Error, match=message):
        load_video(videos.h264, 12, limits=limits)


def test_the_duration_limit_holds_when_the_header_says_less(videos):
    with pytest.raises(
        Ovis2Error, match="longer than the limit of 1s"
    ):  # the header's 0.2 s passes, the frames not
        probe_video(videos.claims_shorter, VideoLimits(max_seconds=1.0))


def test_a_stop_event_ends_the_work(videos):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Ovis2Error, match="cancelled"):
        probe_video(videos.h264, stop=stop)
    probed = probe_video(videos.h264)
    with pytest.raises(Ovis2Error, match="cancelled"):
        decode_video_frames(videos.h264, probed, list(probed.timestamps[:2]), stop=stop)
