"""The engine's decode steps through the compiled decoder layers (ovis2.native_decode) where they run: the tokens
of the layer-by-layer path."""

from __future__ import annotations

import pytest
import torch

from ovis2 import native_decode
from ovis2.cpu_linear import dense_of
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from tests.engine.conftest import mixed_requests, run_to_completion


@pytest.fixture
def bf16_engine(engine_checkpoint, tokenizer) -> LLMEngine:
    """A bf16 engine on its own copy of the tiny checkpoint (the tests change its weights)."""
    if native_decode.compiled_stack() is None:
        pytest.skip(
            "the compiled decode layers: no C compiler here, or not AVX2, or a kernel they call is missing"
        )
    args = EngineArgs(model=str(engine_checkpoint), dtype="bfloat16", device="cpu", kv_cache_memory=8 << 20)
    return LLMEngine(args, tokenizer=tokenizer)


def decode_steps(engine: LLMEngine, monkeypatch, requests: int) -> tuple[list, object]:
    """The arguments of every `native_decode.decoded` call while the first `requests` mixed requests run, and the
    real function."""
    steps = []
    real = native_decode.decoded
    monkeypatch.setattr(native_decode, "decoded", lambda *a: steps.append(a) or real(*a))
    run_to_completion(engine, dict(list(mixed_requests().items())[:requests]))
    return steps, real


def test_the_engine_decodes_through_the_stack_with_the_layer_by_layer_tokens(bf16_engine, monkeypatch):
    """bf16 greedy decoding of text and image requests: every decode step of the engine in one compiled call, and
    the same tokens as with the stack switched off."""
    calls = {"native": 0, "declined": 0}
    real = native_decode.decoded

    def counted(*args):
        out = real(*args)
        calls["native" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(native_decode, "decoded", counted)
    native = run_to_completion(bf16_engine, mixed_requests())
    assert calls["native"] > 10  # the decode steps; prefill steps decline
    monkeypatch.setattr(native_decode, "decoded", lambda *args: None)
    layer_by_layer = run_to_completion(bf16_engine, mixed_requests())
    for request_id, output in native.items():
        assert output.outputs[0].token_ids == layer_by_layer[request_id].outputs[0].token_ids, request_id


def test_steps_the_stack_does_not_read_as_written_go_layer_by_layer(bf16_engine, monkeypatch):
    """A decode step's own arguments run the stack; the same step with RoPE broadcast over the sequences, or a
    table row missing, is declined (None: the layer-by-layer path computes it) instead of read out of bounds."""
    steps, real = decode_steps(bf16_engine, monkeypatch, 2)
    layers, x, rotary, meta = next(s for s in steps if s[3].max_query_len == 1 and s[3].num_seqs > 1)
    with torch.inference_mode():  # as the engine calls it
        assert real(layers, x, rotary, meta) is not None
        broadcast = tuple(t[:1] for t in rotary)
        assert real(layers, x, broadcast, meta) is None
        meta.block_tables = meta.block_tables[:1]
        assert real(layers, x, rotary, meta) is None


def test_the_pointer_table_follows_the_weights(bf16_engine, monkeypatch):
    """The layers' pointer table is kept between steps, and built anew when the weights move: a norm's weight
    replaced by a new tensor; a Linear given a new weight (unpacked: the stack declines) and packed again; a fused
    group released (its members' weights back) declines the stack; fused again, the stack computes what it did."""
    steps, real = decode_steps(bf16_engine, monkeypatch, 1)
    layers, x, rotary, meta = next(s for s in steps if s[3].max_query_len == 1)
    with torch.inference_mode():  # as the engine calls it
        first = real(layers, x, rotary, meta)
        kept = native_decode._tables[layers].table
        assert first is not None and torch.equal(real(layers, x, rotary, meta), first)
        assert native_decode._tables[layers].table is kept
        norm = layers[1].post_attention_layernorm
        norm.weight = torch.nn.Parameter(norm.weight.clone(), requires_grad=False)  # same values
        assert torch.equal(real(layers, x, rotary, meta), first)
        assert native_decode._tables[layers].table is not kept
        down = layers[1].mlp.down_proj
        down.weight = torch.nn.Parameter(dense_of(down.packed_weight), requires_grad=False)
        assert down.packed_weight is None and real(layers, x, rotary, meta) is None
        assert down.pack()
        assert torch.equal(real(layers, x, rotary, meta), first)
        layers[0].mlp.gate_proj.unpack()  # releases the gate/up group
        assert real(layers, x, rotary, meta) is None
        assert layers[0].mlp.fuse_projections()
        again = real(layers, x, rotary, meta)
    assert again is not None and torch.equal(again, first)
