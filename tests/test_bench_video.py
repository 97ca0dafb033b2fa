"""bench/bench_video_decode.py runs end to end on a tiny video and writes what it measured."""

from __future__ import annotations

import json

from bench.bench_video_decode import main


def test_the_video_bench_runs_and_seeking_decodes_fewer_frames(tmp_path, capsys):
    out = tmp_path / "video.json"
    assert (
        main(
            [
                "--seconds",
                "2",
                "--size",
                "64x48",
                "--fps",
                "10",
                "--keyint",
                "4",
                "--frames",
                "3",
                "--rounds",
                "1",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    (result,) = json.loads(out.read_text())["results"]
    assert result["frames"] == result["decoded (every frame)"] == 20 and result["keyframes"] == 5
    assert result["decoded (seek)"] < 20  # three frames, each reached from its own keyframe
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert "keyframe every 4 frames" in capsys.readouterr().out
