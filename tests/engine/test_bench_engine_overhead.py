"""bench/bench_engine_overhead.py runs end to end at a small size and reports consistent figures."""

import json

import pytest

from bench import bench_engine_overhead

SEQUENCES, OUTPUT_TOKENS = 3, 5


def test_overhead_bench_small(capsys):
    bench_engine_overhead.main(["--sequences", str(SEQUENCES), "--output-tokens", str(OUTPUT_TOKENS)])
    report = json.loads(capsys.readouterr().out)
    # every sequence fits in one batch: one step prefills them all and gives each its first token, then one step
    # per token; the warm-up run's steps are not counted
    assert report["steps"] == OUTPUT_TOKENS
    assert 0 < report["execute_ms"] < report["step_ms"]  # the timed execute ran, and inside the timed loop
    # the same time outside execute, as ms per step and as us per sequence per step (each rounded when reported)
    per_sequence_us = report["outside_execute_ms"] * 1000 / SEQUENCES
    rounding_us = 0.0005 * 1000 / SEQUENCES + 0.05
    assert report["outside_us_per_sequence"] == pytest.approx(per_sequence_us, abs=rounding_us)
    assert report["outside_us_per_sequence"] > 0
