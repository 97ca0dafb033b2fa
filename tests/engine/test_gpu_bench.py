"""bench/gpu_bench.py runs end to end at tiny size on CPU (the real run needs a GPU)."""

import json

from bench import gpu_bench


def test_gpu_bench_tiny_on_cpu(capsys):
    gpu_bench.main(["--tiny", "--device", "cpu", "--concurrency", "1", "2", "--prompt-tokens", "16",
                    "--output-tokens", "3", "--sequential-requests", "1"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    rows = [(r["mode"], r["concurrency"]) for r in report["results"]]
    assert rows == [("graphs", 1), ("graphs", 2), ("eager", 1), ("eager", 2)] and report["sequential_tok_s"] > 0
    for row in report["results"]:
        assert row["decode_step_ms"] > 0 and row["step_over_floor"] > 1  # nothing beats the bandwidth floor
