"""The engine's decode steps with decode attention routed to the CUDA kernel (ovis2.triton_decode_attention), run
here under Triton's interpreter: the same greedy tokens and log-probabilities as SDPA over the gathered context,
eager and on the fixed shapes CUDA graphs capture."""

from __future__ import annotations

import os

import pytest

from ovis2 import triton_decode_attention as tda
from ovis2.engine.sampling_params import SamplingParams
from tests.engine.prompts import chat_prompt, text_ids

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the kernel on CPU tensors under Triton's interpreter (tests/conftest.py turns it on without a "
    "GPU); with one, tests/engine/test_decode_graphs_cuda.py checks it on the device",
)


@pytest.mark.parametrize("fixed_decode", [False, True], ids=["eager", "fixed-shape decode"])
def test_engine_decode_steps_through_the_kernel_answer_as_sdpa_does(make_engine, monkeypatch, fixed_decode):
    """The fp32 engine (no CPU kernel for fp32 caches) with decode attention routed to the Triton kernel: the same
    greedy tokens, and log-probabilities within fp32 noise, as SDPA over the gathered context."""
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0, logprobs=2)
    prompts = {"a": chat_prompt(text_ids(3, 9)), "b": chat_prompt(text_ids(4, 40))}

    def answers():
        engine = make_engine()
        if fixed_decode:
            engine.core.runner.enable_decode_graphs(engine.max_model_len, capture=False)
        for request_id, inputs in prompts.items():
            engine.add_request(request_id, inputs, params)
        final = {}
        while engine.has_unfinished_requests:
            final.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        return final

    expected = answers()
    calls = []
    monkeypatch.setattr(tda, "computed", lambda *a: calls.append(1) or tda.paged_decode_attention(*a))
    got = answers()
    assert len(calls) >= 4 * 2  # each decode step's layers (2) took it
    for request_id, choice in expected.items():
        assert got[request_id].token_ids == choice.token_ids
        for mine, theirs in zip(got[request_id].logprobs, choice.logprobs, strict=True):
            assert mine.logprob == pytest.approx(theirs.logprob, rel=1e-4, abs=1e-5)
            assert [t.token_id for t in mine.top] == [t.token_id for t in theirs.top]
            for top_mine, top_theirs in zip(mine.top, theirs.top, strict=True):
                assert top_mine.logprob == pytest.approx(top_theirs.logprob, rel=1e-4, abs=1e-5)
