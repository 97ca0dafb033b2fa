"""bench/gpu_bench.py runs end to end at tiny size on CPU (the real run needs a GPU)."""

import json

from bench import gpu_bench
from ovis2.demo import tiny_config

PROMPT_TOKENS, OUTPUT_TOKENS = 16, 3
BANDWIDTH_TBS = 1e-6  # 1 MB/s: a floor in seconds, so the reported milliseconds (3 decimals) keep every byte


def llm_bytes_per_step(batch: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) a decode step must read, from the tiny model's shapes (fp32 on CPU)."""
    text = tiny_config().text_config
    hidden, heads, kv_heads, head_dim = (
        text.hidden_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
    )
    attention = (
        hidden * heads * head_dim
        + heads * head_dim
        + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim)
    )
    attention += heads * head_dim * hidden  # q, k, v (with bias), o (without)
    layer = attention + 3 * hidden * text.intermediate_size + 2 * hidden  # + SwiGLU MLP, 2 RMSNorms
    embeddings = (
        text.vocab_size * hidden * (1 if tiny_config().tie_word_embeddings else 2)
    )  # + untied lm_head
    weights = text.num_hidden_layers * layer + hidden + embeddings  # + final norm
    context = PROMPT_TOKENS + OUTPUT_TOKENS // 2
    kv = batch * context * 2 * text.num_hidden_layers * kv_heads * head_dim  # K and V
    return 4 * weights, 4 * kv


def test_gpu_bench_tiny_on_cpu(capsys):
    gpu_bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--concurrency",
            "1",
            "2",
            "--prompt-tokens",
            str(PROMPT_TOKENS),
            "--output-tokens",
            str(OUTPUT_TOKENS),
            "--sequential-requests",
            "1",
            "--bandwidth-tbs",
            str(BANDWIDTH_TBS),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    rows = [(r["mode"], r["concurrency"]) for r in report["results"]]
    assert {r["attention"] for r in report["results"]} == {"kernel"}  # no Triton kernel on CPU: one pass
    assert (
        rows == [("graphs", 1), ("graphs", 2), ("eager", 1), ("eager", 2)] and report["sequential_tok_s"] > 0
    )
    for row in report["results"]:
        assert row["decode_step_ms"] > 0 and row["engine_tok_s"] > 0
        # the floor reads every LLM weight once and every sequence's K and V, at the given bandwidth
        expected_ms = sum(llm_bytes_per_step(row["concurrency"])) / (BANDWIDTH_TBS * 1e12) * 1000
        assert (
            abs(row["bandwidth_floor_step_ms"] - expected_ms) <= 0.0005 + 1e-9 * expected_ms
        )  # its rounding
