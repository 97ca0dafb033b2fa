"""Linears that read the same input packed as one oneDNN product (fused_linear): each member's product as before,
the state dict unchanged, and every way a member takes its own weight back turning the group off.

fp32 packing runs on any CPU with oneDNN, so these run everywhere with `dtypes={torch.float32}`; the engine's
policy (bf16 where oneDNN computes bf16 itself) is checked in tests/test_packed_linear.py."""

from __future__ import annotations

import pytest
import torch

from ovis2 import bf16_rows, cpu_linear
from ovis2.bf16_rows import PanelWeight
from ovis2.cpu_linear import Linear, onednn_packing_available
from ovis2.fused_linear import fuse
from ovis2.layers import SwiGLU

from .linear_bounds import assert_near_reference

FP32 = {torch.float32}


@pytest.fixture(autouse=True)
def packable():
    if not onednn_packing_available(torch.float32):
        pytest.skip("oneDNN cannot pack float32 weights on this CPU")


def members(sizes=(64, 16, 16), in_features=48, bias=True, seed=0) -> list[Linear]:
    torch.manual_seed(seed)
    return [Linear(in_features, size, bias=bias).requires_grad_(False) for size in sizes]


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_each_member_gets_its_own_product(rows, with_bias):
    group = members(bias=with_bias, seed=rows)
    weights = [m.weight.clone() for m in group]
    biases = [None if m.bias is None else m.bias.clone() for m in group]
    fused = fuse(group, FP32)
    assert (
        fused is not None and fused.active and all(m.weight.numel() == 0 for m in group)
    )  # plain copies freed
    x = torch.randn(2, rows, 48)
    outs = fused(x).split([64, 16, 16], dim=-1)
    for out, weight, bias in zip(outs, weights, biases, strict=True):
        assert out.shape == (2, rows, weight.shape[0])
        assert_near_reference(out, x, weight, bias)


def test_state_dict_unchanged_and_a_member_alone_still_computes():
    group = members()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in group]
    fuse(group, FP32)
    for module, saved in zip(group, before, strict=True):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())  # a permutation: exact
    x = torch.randn(3, 48)
    assert_near_reference(group[1](x), x, before[1]["weight"], before[1]["bias"])


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_a_member_given_a_new_parameter_releases_the_group(name):
    """The group holds copies of its members' weights and biases: a new one for any member ends the group, so the
    new values are the ones computed."""
    group = members()
    fused = fuse(group, FP32)
    new = torch.full_like(group[1].state_dict()[name], 0.5)
    setattr(group[1], name, torch.nn.Parameter(new, requires_grad=False))
    assert not fused.active and all(m.fused_into is None for m in group)
    x = torch.randn(3, 48)
    weight, bias = group[1].weight, group[1].bias
    assert torch.equal(weight if name == "weight" else bias, new)
    assert_near_reference(group[1](x), x, weight, bias)


def test_a_packed_linear_given_a_new_weight_computes_with_it():
    module = members(sizes=(64,))[0]
    assert module.pack()
    new = torch.randn(64, 48)
    module.weight = torch.nn.Parameter(new.clone(), requires_grad=False)
    assert module.packed_weight is None
    x = torch.randn(3, 48)
    assert_near_reference(module(x), x, new, module.bias)


def test_unpacking_one_member_gives_every_member_its_weight_and_frees_the_packed_one():
    group = members()
    weights = [m.weight.clone() for m in group]
    fused = fuse(group, FP32)
    group[2].unpack()
    assert not fused.active and fused.packed is None
    assert all(m.fused_into is None and torch.equal(m.weight, w) for m, w in zip(group, weights, strict=True))
    x = torch.randn(3, 48)
    assert torch.equal(
        group[0](x), torch.nn.functional.linear(x, weights[0], group[0].bias)
    )  # the plain path


def test_loading_or_converting_turns_the_group_off():
    group, other = members(seed=1), members(seed=2)
    fused = fuse(group, FP32)
    group[0].load_state_dict(other[0].state_dict())
    assert not fused.active and torch.equal(group[0].weight, other[0].weight)
    group = members(seed=3)
    weight = group[1].weight.clone()
    fused = fuse(group, FP32)
    group[1].to(torch.float64)
    assert not fused.active and torch.equal(group[1].weight, weight.double())


@pytest.mark.parametrize(
    "group",
    [
        lambda: members(sizes=(8,)) + [Linear(40, 8)],  # another input size
        lambda: members(sizes=(8,)) + members(sizes=(8,), bias=False),  # a bias on one only
        lambda: members(sizes=(8, 8))[:1] + [Linear(48, 8).double()],  # another dtype
    ],
)
def test_members_that_do_not_fit_are_left_alone(group):
    group = group()
    weights = [m.weight.clone() for m in group]
    assert fuse(group, FP32) is None
    assert all(m.fused_into is None and torch.equal(m.weight, w) for m, w in zip(group, weights, strict=True))


def test_a_packed_member_is_left_alone():
    group = members()
    group[0].pack()
    assert fuse(group, FP32) is None and group[1].weight.numel() > 0


def test_default_policy_fuses_only_where_bf16_is_packed(monkeypatch):
    from ovis2 import fused_linear

    assert fuse(members()) is None  # fp32: the engine keeps cpu_linear's dispatch
    monkeypatch.setattr(fused_linear, "packs_weights", lambda dtype: False)
    assert fuse([m.to(torch.bfloat16) for m in members()]) is None


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_where_bf16_rows_serves_the_group_is_one_panel_weight(rows, monkeypatch):
    """AVX2 only: the members' rows laid out as bf16_rows' panels of one weight (96 rows: 6 panels), computed by
    its kernel; the state dict unchanged and release giving each member its rows back."""
    if not cpu_linear.lays_out_panels(torch.bfloat16):
        pytest.skip("bf16_rows' kernel does not serve here")
    calls = []
    real = bf16_rows.panels_computed
    monkeypatch.setattr(bf16_rows, "panels_computed", lambda *args: calls.append(1) or real(*args))
    group = [m.to(torch.bfloat16) for m in members(seed=rows)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in group]
    fused = fuse(group)
    assert fused is not None and fused.active and all(m.weight.numel() == 0 for m in group)
    assert isinstance(fused.packed, PanelWeight) and fused.packed.data.shape == (6, 48, 16)
    x = torch.randn(2, rows, 48).to(torch.bfloat16)
    for out, saved in zip(fused(x).split([64, 16, 16], dim=-1), before, strict=True):
        assert_near_reference(out, x, saved["weight"], saved["bias"])
    assert calls == [1]  # one product for the group, the panels kernel's
    for module, saved in zip(group, before, strict=True):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())
    fused.release()
    assert not fused.active and all(
        torch.equal(m.weight, s["weight"]) for m, s in zip(group, before, strict=True)
    )


def test_swiglu_fused_matches_unfused_and_fusing_again_keeps_the_group():
    torch.manual_seed(0)
    mlp = SwiGLU(48, 80).requires_grad_(False)
    x = torch.randn(7, 48)
    expected = mlp(x)
    assert mlp.fuse_projections(FP32) and mlp.fused_gate_up.active
    group = mlp.fused_gate_up
    got = mlp(x)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale
    assert (
        mlp.fuse_projections(FP32) and mlp.fused_gate_up is group and group.active
    )  # a second pack_cpu_weights
    mlp.gate_proj.unpack()
    assert mlp.fuse_projections(FP32) and mlp.fused_gate_up is not group and mlp.fused_gate_up.active
