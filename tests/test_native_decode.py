"""A decode step's decoder layers in one compiled call (ovis2.native_decode): the layer computed in PyTorch ops
(float64 products rounded once, bf16 roundings where the model's ops round) within bf16 steps, on Ovis2-1B's head
layout, many sequences (the threaded steps) and row tails; refused tables write nothing; SiLU-and-multiply against
PyTorch's over every bf16 value (the engine's use: tests/engine/test_native_decode_engine.py).

The stack needs a C compiler and a CPU with AVX2 (and the few-row product, RMSNorm and attention kernels it calls)."""

from __future__ import annotations

import random

import pytest
import torch

from ovis2 import fused_pointwise, native_decode

ONE_B_HEADS = dict(heads=14, kv_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def stack():
    built = native_decode.compiled_stack()
    if built is None:
        pytest.skip(
            "the compiled decode layers: no C compiler here, or not AVX2, or a kernel they call is missing"
        )
    return built


def dims_for(hidden, intermediate, num_blocks, max_blocks, heads=6, kv_heads=2, head_dim=16, block_size=16):
    return native_decode.Dims(
        hidden,
        heads,
        kv_heads,
        head_dim,
        intermediate,
        block_size,
        num_blocks,
        max_blocks,
        1e-6,
        head_dim**-0.5,
    )


@pytest.mark.parametrize(
    "seqs, hidden, intermediate", [(1, 128, 256), (3, 44, 52), (20, 128, 200), (128, 64, 96)]
)
def test_the_stack_matches_the_layers_in_pytorch_ops(stack, seqs, hidden, intermediate):
    lens = [random.Random(seqs * 100 + i).randint(1, 100) for i in range(seqs)]
    dims = dims_for(hidden, intermediate, num_blocks=7 * seqs + 1, max_blocks=7, **ONE_B_HEADS)
    case = native_decode.random_case(dims, lens, num_layers=3, seed=seqs)
    expected, expected_caches = native_decode.reference_stack(case, dims)
    got = native_decode.computed_stack(stack, case, dims)
    assert got is not None
    assert native_decode.close_to(got, expected, steps=4)  # fp32 sums against float64 ones, through 3 layers
    for pair, wanted in zip(case.caches, expected_caches, strict=True):
        for written, expected_cache in zip(pair, wanted, strict=True):
            assert native_decode.close_to(written, expected_cache, steps=4)


def test_a_wrong_weight_is_caught_by_the_same_comparison(stack):
    """The comparison above can fail: the gate and up halves swapped give a different layer."""
    dims = dims_for(40, 52, num_blocks=8, max_blocks=3)
    case = native_decode.random_case(dims, [5, 17, 33], num_layers=1, seed=0)
    expected, _ = native_decode.reference_stack(case, dims)
    gate, up = case.layers[0]["gate_up"].chunk(2)
    case.layers[0]["gate_up"] = torch.cat([up, gate])
    got = native_decode.computed_stack(stack, case, dims)
    assert not native_decode.close_to(got, expected, steps=8)


@pytest.mark.parametrize(
    "fault", ["slot not the last position", "block outside the cache", "no keys", "two sequences, one slot"]
)
def test_a_refused_step_writes_nothing(stack, fault):
    dims = dims_for(40, 52, num_blocks=8, max_blocks=3)
    case = native_decode.random_case(dims, [5, 17, 33], num_layers=2, seed=3)
    meta = case.meta
    if fault == "slot not the last position":
        meta.slot_mapping[1] -= 1
    elif fault == "block outside the cache":
        meta.block_tables[2, 1] = dims.num_blocks
    elif fault == "two sequences, one slot":  # each slot its sequence's last position, both the same
        meta.block_tables[1], meta.seq_lens[1] = meta.block_tables[0], meta.seq_lens[0]
        meta.slot_mapping[1] = meta.slot_mapping[0]
    else:
        meta.seq_lens[0] = 0
    before_x, before = case.x.clone(), [c.clone() for pair in case.caches for c in pair]
    assert native_decode.computed_stack(stack, case, dims) is None
    assert torch.equal(case.x, before_x)
    assert all(
        torch.equal(c, b) for c, b in zip([c for pair in case.caches for c in pair], before, strict=True)
    )


def every_bf16_value() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def test_silu_mul_is_pytorchs_within_one_rounding_over_every_bf16_value(stack):
    """Every bf16 pattern as the gate (NaN, infinities, subnormals, |x| past exp's range), times up = 1 and 3: the
    same bf16 value as PyTorch's composite, or one bf16 step from it where exp's last fp32 bit tips a rounding."""
    gate = every_bf16_value().view(64, 1024)
    for up_value in (1.0, 3.0):
        up = torch.full_like(gate, up_value)
        gate_up = torch.cat([gate, up], dim=1).contiguous()
        got = torch.empty_like(gate)
        stack.library.silu_mul_bf16(gate_up.data_ptr(), got.data_ptr(), 64, 1024, 2)
        expected = fused_pointwise.reference_silu_mul(gate, up)
        nan = expected.isnan()
        assert torch.equal(got.isnan(), nan)
        got, expected = got[~nan].double(), expected[~nan].double()
        same = got == expected
        assert same.float().mean() > 0.999
        step = expected.abs() * 2**-7 + torch.finfo(torch.bfloat16).smallest_normal
        assert (same | ((got - expected).abs() <= step)).all()


def test_switched_off_means_no_stack(stack, monkeypatch, tmp_path):
    monkeypatch.setenv("OVIS2_CACHE", str(tmp_path))
    monkeypatch.setenv("OVIS2_NATIVE_DECODE", "0")
    native_decode.compiled_stack.cache_clear()
    try:
        assert native_decode.compiled_stack() is None
    finally:
        native_decode.compiled_stack.cache_clear()
