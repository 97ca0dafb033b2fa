"""On CUDA, decode steps replayed as CUDA graphs give the tokens of eager steps (bench/gpu_session.sh runs this)."""

from __future__ import annotations

import pytest
import torch

from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from tests.engine.conftest import mixed_requests, run_to_completion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graph_replays_match_eager_steps(engine_checkpoint, tokenizer):
    from ovis2.modeling import Ovis2ForConditionalGeneration

    model = Ovis2ForConditionalGeneration.from_pretrained(
        str(engine_checkpoint), dtype="float32", device="cuda"
    )
    finals = {}
    for eager in (False, True):
        args = EngineArgs(
            model=str(engine_checkpoint),
            dtype="float32",
            device="cuda",
            enforce_eager=eager,
            kv_cache_memory=64 * 1024 * 1024,
        )
        engine = LLMEngine(args, model=model, tokenizer=tokenizer)
        assert (engine.core.runner.decode_graphs is None) == eager
        finals[eager] = {
            rid: out.outputs[0].token_ids for rid, out in run_to_completion(engine, mixed_requests()).items()
        }
        if not eager:
            assert any(fixed.graph is not None for fixed in engine.core.runner.decode_graphs.buckets.values())
    assert finals[False] == finals[True]


def test_the_triton_decode_attention_runs_here_and_answers_as_sdpa(engine_checkpoint, tokenizer, monkeypatch):
    """The kernel passes its check on this GPU (bf16 and fp32 caches), and an fp32 engine whose decode graphs
    capture it gives SDPA's greedy tokens."""
    from ovis2 import triton_decode_attention as tda
    from ovis2.modeling import Ovis2ForConditionalGeneration

    device = torch.device("cuda", torch.cuda.current_device())
    assert tda.ready(device, torch.bfloat16) and tda.ready(device, torch.float32)
    model = Ovis2ForConditionalGeneration.from_pretrained(
        str(engine_checkpoint), dtype="float32", device="cuda"
    )
    calls = []
    kernel = tda.paged_decode_attention
    monkeypatch.setattr(tda, "paged_decode_attention", lambda *a: calls.append(1) or kernel(*a))
    finals = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("OVIS2_TRITON_ATTENTION", switch)
        args = EngineArgs(
            model=str(engine_checkpoint), dtype="float32", device="cuda", kv_cache_memory=64 * 1024 * 1024
        )
        engine = LLMEngine(args, model=model, tokenizer=tokenizer)
        finals[switch] = {
            rid: out.outputs[0].token_ids for rid, out in run_to_completion(engine, mixed_requests()).items()
        }
        assert bool(calls) == (switch == "1")
        calls.clear()
    assert finals["1"] == finals["0"]
