"""Fixed-shape decode steps (the CUDA-graph path, run eagerly on CPU) give the tokens of the eager path."""

from __future__ import annotations

from ovis2.engine import decode_graphs
from ovis2.engine.decode_graphs import context_buckets, next_bucket
from ovis2.engine.sampling_params import SamplingParams
from tests.engine.conftest import (
    GREEDY,
    assert_matches_reference,
    kv_block_bytes,
    mixed_requests,
    run_to_completion,
)
from tests.engine.prompts import chat_prompt, text_ids


def fixed_decode_engine(make_engine, **args):
    engine = make_engine(**args)
    engine.core.runner.enable_decode_graphs(engine.max_model_len, capture=False)
    return engine


def test_buckets():
    assert context_buckets(40) == (16, 32, 40)
    assert context_buckets(16) == (16,)
    assert next_bucket(3, (1, 2, 4, 8)) == 4 and next_bucket(9, (1, 2, 4, 8)) is None


def test_mixed_requests_match_generate(make_engine, reference):
    engine = fixed_decode_engine(make_engine)
    final = run_to_completion(engine, mixed_requests())
    assert_matches_reference(final, reference)
    buckets = set(engine.core.runner.decode_graphs.buckets)
    assert {batch for batch, _ in buckets} >= {16, 8, 1}  # the batch shrinks as requests finish
    assert len({blocks for _, blocks in buckets}) >= 2  # contexts of text and image prompts
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_preempted_requests_resume_with_the_same_tokens(make_engine, reference, engine_model):
    memory = 80 * kv_block_bytes(engine_model)
    engine = fixed_decode_engine(make_engine, kv_cache_memory=memory, enable_prefix_caching=False)
    final = run_to_completion(engine, mixed_requests())
    assert engine.stats.num_preemptions > 0
    assert_matches_reference(final, reference)
    assert engine.core.block_manager.num_free_blocks == 80


def _requests(count: int) -> dict:
    return {
        f"r{i}": (chat_prompt(text_ids(i, 10)), SamplingParams(max_tokens=3, **GREEDY)) for i in range(count)
    }


def _scratch_written(engine) -> bool:
    return any(bool(k[engine.core.runner.scratch_block].any()) for k, _ in engine.core.runner.kv_caches)


def test_padding_rows_write_into_the_scratch_block_only(make_engine):
    """Corrupting a real block would change tokens (the parity tests); here: padding goes to the scratch block."""
    unpadded = fixed_decode_engine(make_engine)
    run_to_completion(unpadded, _requests(4))
    assert set(unpadded.core.runner.decode_graphs.buckets) == {(4, 16)} and not _scratch_written(unpadded)
    padded = fixed_decode_engine(make_engine)
    run_to_completion(padded, _requests(3))
    assert set(padded.core.runner.decode_graphs.buckets) == {(4, 16)} and _scratch_written(padded)
    assert padded.core.block_manager.num_free_blocks == padded.core.block_manager.num_total_blocks


def test_steps_outside_the_buckets_run_eagerly(make_engine, monkeypatch):
    monkeypatch.setattr(decode_graphs, "MAX_TOKEN_SLOTS", 16 * 16)  # one row of 16 blocks at most
    engine = fixed_decode_engine(make_engine)
    requests = _requests(3)
    eager = run_to_completion(make_engine(), requests)
    fixed = run_to_completion(engine, requests)
    assert not engine.core.runner.decode_graphs.buckets
    assert {k: v.outputs[0].token_ids for k, v in fixed.items()} == {
        k: v.outputs[0].token_ids for k, v in eager.items()
    }


def test_a_bucket_whose_capture_fails_runs_eagerly_from_then_on(make_engine, monkeypatch):
    attempts = []

    def failing_capture(self, pool):
        attempts.append((self.batch, self.blocks))
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(decode_graphs.FixedDecode, "capture", failing_capture)
    engine = fixed_decode_engine(make_engine)
    engine.core.runner.decode_graphs.capture = (
        True  # what CUDA does; the pool is not needed by the failing capture
    )
    requests = _requests(3)
    eager = run_to_completion(make_engine(), requests)
    fixed = run_to_completion(engine, requests)
    assert attempts == [(4, 16)] and engine.core.runner.decode_graphs.failed == {
        (4, 16)
    }  # tried once, not per step
    assert not engine.core.runner.decode_graphs.buckets
    assert {k: v.outputs[0].token_ids for k, v in fixed.items()} == {
        k: v.outputs[0].token_ids for k, v in eager.items()
    }
