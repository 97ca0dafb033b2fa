"""Time to read a video and decode the recipe's sampled frames (ovis2/video.py), against decoding every frame.

    .venv/bin/python -m bench.bench_video_decode [--seconds 60] [--size 1280x720] [--fps 30] [--keyint 250 60]
                                                [--frames 12] [--rounds 5] [--output-json out.json]

Encodes an h264 mp4 (libx264, preset veryfast, moving gradients so that frames differ) of the given length and
size once per keyframe interval, then per round: `probe_video` (the packets read, nothing decoded), the sampled
frames decoded by seeking to each one's keyframe (`decode_video_frames`, what the server does), and a baseline
that decodes every frame in order and keeps the sampled ones. Reports the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_video(path: Path, seconds: int, size: tuple[int, int], fps: int, keyint: int) -> Path:
    import av

    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(keyint)}
        for i in range(seconds * fps):
            frame = np.empty((height, width, 3), np.uint8)
            frame[..., 0] = (xs + ys + 3 * i) % 256
            frame[..., 1] = (xs // 8 + i) % 256
            frame[..., 2] = (ys // 4 + 2 * i) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode_everything(data: bytes, wanted: set[int]) -> int:
    """The baseline: every frame decoded in order, the sampled ones converted; returns frames decoded."""
    import io

    import av

    count = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        for frame in container.decode(stream):
            count += 1
            if frame.pts in wanted:
                frame.to_image()
    return count


def measure(data: bytes, num_frames: int, rounds: int) -> dict:
    from ovis2.video import decode_video_frames
    from ovis2.video_probe import VideoLimits, probe_video
    from ovis2.video_sampling import sample_timestamps

    limits = VideoLimits(max_bytes=len(data) + 1, timeout=600.0)
    timings = {"probe": [], "sampled (seek)": [], "every frame": []}
    for _ in range(rounds):
        start = time.perf_counter()
        probed = probe_video(data, limits)
        timings["probe"].append(time.perf_counter() - start)
        wanted = sample_timestamps(list(probed.timestamps), probed.end, num_frames)
        start = time.perf_counter()
        sampled = decode_video_frames(data, probed, wanted, limits)
        timings["sampled (seek)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        everything = decode_everything(data, set(wanted))
        timings["every frame"].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "seconds": medians,
        "frames": len(probed.timestamps),
        "keyframes": len(probed.keyframes),
        "decoded (seek)": sampled.num_decoded,
        "decoded (every frame)": everything,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--keyint", type=int, nargs="+", default=[250, 60], help="frames between keyframes")
    parser.add_argument("--frames", type=int, default=12, help="frames sampled (the recipe's 12)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)
    size = tuple(int(n) for n in args.size.lower().split("x"))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for keyint in args.keyint:
            path = make_video(Path(folder) / f"bench-{keyint}.mp4", args.seconds, size, args.fps, keyint)
            result = measure(path.read_bytes(), args.frames, args.rounds)
            results.append({"keyint": keyint, "bytes": path.stat().st_size, **result})
            report(args, results[-1])
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(
            json.dumps(
                {"args": {**vars(args), "output_json": str(args.output_json)}, "results": results}, indent=2
            )
            + "\n"
        )
    return 0


def report(args, result: dict) -> None:
    seconds = result["seconds"]
    print(
        f"{args.seconds}s {args.size} h264 @ {args.fps} fps, keyframe every {result['keyint']} frames "
        f"({result['keyframes']} keyframes, {result['frames']} frames, {result['bytes'] / 1e6:.1f} MB), "
        f"{args.frames} frames sampled, median of {args.rounds}:"
    )
    print(f"  read packets (probe_video):      {seconds['probe'] * 1000:8.1f} ms")
    print(
        f"  decode sampled frames, seeking:  {seconds['sampled (seek)'] * 1000:8.1f} ms "
        f"({result['decoded (seek)']} frames decoded)"
    )
    print(
        f"  decode every frame (baseline):   {seconds['every frame'] * 1000:8.1f} ms "
        f"({result['decoded (every frame)']} frames decoded)"
    )
    total = seconds["probe"] + seconds["sampled (seek)"]
    print(
        f"  ours in all (probe + decode):    {total * 1000:8.1f} ms, "
        f"{seconds['every frame'] / total:.1f}x faster than decoding every frame",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
