"""Linear weights packed once (cpu_linear.pack_linears): the same products, the plain weight freed yet still in
the state dict, shared weights kept, and the engine packing where it helps.

fp32 packing (oneDNN's blocked layout) runs on any CPU with oneDNN, so the packed path is checked everywhere; bf16
where oneDNN computes bf16 itself (AMX, AVX512-BF16: its layout) or bf16_rows' kernel serves (AVX2: its panels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ovis2 import bf16_rows, cpu_linear
from ovis2.bf16_rows import PanelWeight
from ovis2.cpu_linear import Linear, can_pack, pack_linears

from .linear_bounds import assert_near_reference


def packable(dtype: torch.dtype) -> None:
    if not can_pack(dtype):
        pytest.skip(f"{dtype} weights are not packed on this CPU")


def layer(out_features=300, in_features=96, bias=True, dtype=torch.float32, seed=0) -> Linear:
    torch.manual_seed(seed)
    return Linear(in_features, out_features, bias=bias).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 1030])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows_hint", [None, 1, 16])
def test_packed_products_match_reference(dtype, rows, with_bias, rows_hint):
    packable(dtype)
    module = layer(bias=with_bias, dtype=dtype, seed=rows)
    weight = module.weight.clone()
    bias = None if module.bias is None else module.bias.clone()
    assert module.pack(rows_hint=rows_hint)
    assert module.packed_weight is not None and module.weight.numel() == 0  # the plain copy is freed
    x = torch.randn(rows, 96).to(dtype)
    out = module(x)
    assert out.shape == (rows, 300) and out.dtype == dtype
    assert_near_reference(out, x, weight, bias)


def test_leading_dimensions_and_no_rows():
    packable(torch.float32)
    module = layer()
    weight, bias = module.weight.clone(), module.bias.clone()
    module.pack()
    x = torch.randn(2, 5, 96)
    assert_near_reference(module(x), x, weight, bias)
    assert module(torch.randn(0, 96)).shape == (0, 300)


def test_state_dict_holds_the_plain_weight():
    packable(torch.float32)
    module = layer()
    original = {k: v.clone() for k, v in module.state_dict().items()}
    module.pack()
    saved = module.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)  # reordering is a permutation: exact


def test_loading_a_state_dict_unpacks_and_takes_the_new_weights():
    packable(torch.float32)
    module, other = layer(seed=1), layer(seed=2)
    module.pack()
    module.load_state_dict(other.state_dict())
    assert module.packed_weight is None
    x = torch.randn(4, 96)
    assert torch.equal(module(x), other(x))


def test_conversion_unpacks():
    packable(torch.float32)
    module = layer()
    weight = module.weight.clone()
    module.pack()
    module.to(torch.float64)
    assert module.packed_weight is None and torch.equal(module.weight, weight.double())


def test_input_needing_gradients_takes_the_plain_product():
    packable(torch.float32)
    module = layer()
    weight = module.weight.clone()
    module.pack()
    x = torch.randn(3, 96, requires_grad=True)
    module(x).sum().backward()
    expected = weight.sum(0).expand(3, -1)
    assert ((x.grad - expected).abs() <= 96 * torch.finfo(torch.float32).eps * weight.abs().sum(0)).all()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 96)
        self.head = Linear(96, 300, bias=False)
        self.head.weight = self.embed.weight
        self.own = Linear(96, 96)


def test_pack_linears_keeps_shared_weights_and_frees_the_rest():
    packable(torch.float32)
    model = Tied().requires_grad_(False)
    table = model.embed.weight.clone()
    assert pack_linears(model, dtypes={torch.float32}) == 2
    assert model.head.packed_weight is not None and model.own.packed_weight is not None
    assert model.embed.weight.shape == (300, 96) and torch.equal(model.embed.weight, table)  # still embeds
    assert model.own.weight.numel() == 0
    hidden = torch.randn(2, 96)
    assert_near_reference(model.head(hidden), hidden, table)
    assert pack_linears(model, dtypes={torch.float32}) == 0  # already packed


def test_default_policy_packs_bf16_only(monkeypatch):
    model = Tied().requires_grad_(False)
    assert pack_linears(model) == 0  # fp32: the dispatch of cpu_linear.linear stays
    model = model.to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: False)
    monkeypatch.setattr(cpu_linear, "bf16_rows_serve", lambda: False)
    assert pack_linears(model) == 0  # bf16 emulated and no kernel: widened to fp32 per call instead


def test_panels_where_bf16_rows_serves(monkeypatch):
    """AVX2 only: every bf16 Linear packs as bf16_rows' panels, the tied head beside the embedding table it
    shares, and computes what the plain weight does, through the panels kernel."""
    if not cpu_linear.lays_out_panels(torch.bfloat16):
        pytest.skip("bf16_rows' kernel does not serve here")
    calls = []
    real = bf16_rows.panels_computed
    monkeypatch.setattr(bf16_rows, "panels_computed", lambda *args: calls.append(1) or real(*args))
    model = Tied().to(torch.bfloat16).requires_grad_(False)
    table, own = model.embed.weight.clone(), model.own.weight.clone()
    assert pack_linears(model) == 2
    assert all(isinstance(m.packed_weight, PanelWeight) for m in (model.head, model.own))
    assert model.own.weight.numel() == 0 and torch.equal(model.embed.weight, table)
    assert torch.equal(model.own.state_dict()["weight"], own)
    hidden = torch.randn(3, 96).to(torch.bfloat16)
    assert_near_reference(model.head(hidden), hidden, table)
    assert_near_reference(model.own(hidden), hidden, own, model.own.bias)
    assert len(calls) == 2


def test_engine_model_packed_where_it_helps(tiny_checkpoint):
    """The engine's own load packs every Linear where bf16 packs here (the language model's q/k/v and gate/up
    fused into one packed product each; bf16_rows' panels where its kernel serves), none otherwise; the logits of
    a packed model match the unpacked one."""
    from ovis2.engine.engine_args import EngineArgs
    from ovis2.engine.model_loading import load_model

    args = EngineArgs(model=str(tiny_checkpoint), dtype="bfloat16", device="cpu")
    model = load_model(args)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    packed = [m for m in linears if m.packed_weight is not None]
    fused = [m for m in linears if m.fused_into is not None]
    language = list(model.model.language_model.modules())
    if cpu_linear.packs_weights(torch.bfloat16):
        assert len(packed) + len(fused) == len(linears)
        assert fused and all(any(m is owned for owned in language) for m in fused)
        forms = [m.packed_weight for m in packed] + [m.fused_into.packed for m in fused]
        panels = cpu_linear.lays_out_panels(torch.bfloat16)
        assert all(isinstance(form, PanelWeight) == panels for form in forms)
    else:
        assert not packed and not fused
    reference = load_model(args)
    for module in reference.modules():
        if isinstance(module, Linear):
            module.unpack()
    hidden = torch.randn(3, model.config.text_config.hidden_size).to(torch.bfloat16)
    got, expected = model.compute_logits(hidden), reference.compute_logits(hidden)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * scale
