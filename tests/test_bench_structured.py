"""bench/bench_structured.py runs end to end at a small size and reports consistent figures."""

import json

import pytest

from bench import bench_structured

SEQUENCES, OUTPUT_TOKENS = 2, 4


def test_structured_bench_small(capsys):
    bench_structured.main(
        ["--sequences", str(SEQUENCES), "--output-tokens", str(OUTPUT_TOKENS), "--repeats", "1"]
    )
    report = json.loads(capsys.readouterr().out)
    free, constrained = report["free"], report["constrained"]
    # the first token comes with the prefill step, which is not counted: one decode step per further token
    assert free["steps"] == constrained["steps"] == OUTPUT_TOKENS - 1
    assert (
        free["min_output_tokens"] == constrained["min_output_tokens"] == OUTPUT_TOKENS
    )  # no answer ended early
    assert constrained["bitmask_ms"] > 0 and constrained["accept_ms"] > 0 and free["accept_ms"] == 0
    assert constrained["bitmask_ms"] > free["bitmask_ms"]  # free rows only pass through the check
    grammar_ms = constrained["bitmask_ms"] + constrained["accept_ms"]
    assert report["grammar_ms_per_step"] == pytest.approx(grammar_ms, abs=0.002)
    assert report["grammar_share_of_step"] == pytest.approx(grammar_ms / constrained["step_ms"], abs=1e-3)
    assert 0 < report["grammar_share_of_step"] < 1
