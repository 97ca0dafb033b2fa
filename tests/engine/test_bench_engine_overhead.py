"""bench/bench_engine_overhead.py runs end to end at a small size and reports consistent figures."""

import json

from bench import bench_engine_overhead


def test_overhead_bench_small(capsys):
    bench_engine_overhead.main(["--sequences", "3", "--output-tokens", "5"])
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] >= 5
    assert abs(report["step_ms"] - report["execute_ms"] - report["outside_execute_ms"]) < 0.01
    assert report["execute_ms"] > 0 and report["outside_us_per_sequence"] > 0
