"""The engine and generate() on a model whose q/k/v and gate/up are fused (fused_linear, packed in fp32 here so it runs on any
CPU): the tokens of generate() on the unfused model, on the eager path and on fixed-shape decode steps."""

from __future__ import annotations

import pytest
import torch

from ovis2.cpu_linear import onednn_packing_available, pack_linears
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.layers import SwiGLU
from ovis2.modeling import Ovis2ForConditionalGeneration, Qwen2Attention
from tests.engine.conftest import (
    assert_matches_reference,
    mixed_requests,
    reference_tokens,
    run_to_completion,
)


@pytest.fixture(scope="module")
def fused_model(engine_checkpoint):
    if not onednn_packing_available(torch.float32):
        pytest.skip("oneDNN cannot pack float32 weights on this CPU")
    model = Ovis2ForConditionalGeneration.from_pretrained(
        str(engine_checkpoint), dtype="float32", device="cpu"
    )
    owners = [m for m in model.model.language_model.modules() if isinstance(m, Qwen2Attention | SwiGLU)]
    assert all(owner.fuse_projections({torch.float32}) for owner in owners)
    pack_linears(
        model, dtypes={torch.float32}
    )  # o_proj, down_proj, the vocabulary: packed as the engine does
    return model


@pytest.mark.parametrize("fixed_decode", [False, True])
def test_fused_model_gives_the_reference_tokens(
    fused_model, engine_checkpoint, tokenizer, reference, fixed_decode
):
    args = EngineArgs(model=str(engine_checkpoint), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    engine = LLMEngine(args, model=fused_model, tokenizer=tokenizer)
    if fixed_decode:
        engine.core.runner.enable_decode_graphs(engine.max_model_len, capture=False)
    assert_matches_reference(run_to_completion(engine, mixed_requests()), reference)


def test_fused_model_generates_the_reference_tokens(fused_model, reference):
    """generate()'s padded path on the fused model: the unfused model's tokens."""
    for request_id, (inputs, params) in list(mixed_requests().items())[:6]:
        assert reference_tokens(fused_model, inputs, params.max_tokens) == reference[request_id], request_id
