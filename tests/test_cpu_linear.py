"""ovis2.cpu_linear against F.linear: every path its dispatch takes (one row, the transposed product, oneDNN, bf16
widened to fp32), with bias, leading dimensions and the vocabulary projection's block edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovis2 import cpu_linear
from ovis2.cpu_linear import Linear, linear


def reordered_product_bound(x: torch.Tensor, weight: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How far a correct x @ weight.T may be from another one, per element: a float32 sum of K products taken in
    another order moves by at most K ulps of sum |x * w| (the classic bound); a bfloat16 result adds one rounding
    of the output."""
    magnitude = x.float().abs() @ weight.float().abs().t()
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * magnitude
    if x.dtype != torch.float32:
        bound = bound + torch.finfo(x.dtype).eps * expected.abs()
    return bound


def check(x, weight, bias=None):
    out = linear(x, weight, bias)
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == x.dtype and out.is_contiguous()
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    flat_x = x.reshape(-1, x.shape[-1])
    bound = reordered_product_bound(flat_x, weight, expected.reshape(flat_x.shape[0], -1).float())
    error = (out.double() - expected).reshape(bound.shape).abs()
    final_rounding = torch.finfo(torch.float32).eps * expected.reshape(bound.shape).abs()  # adding the bias
    assert (error <= bound.double() + final_rounding).all()


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 16, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(rows, dtype, with_bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(2800, 96, generator=generator).to(dtype)
    bias = torch.randn(2800, generator=generator).to(dtype) if with_bias else None
    check(torch.randn(rows, 96, generator=generator).to(dtype), weight, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widened_path_matches_reference(monkeypatch, dtype):
    """bf16 on a CPU without bf16 instructions: forced here, whatever this CPU has; blocks smaller than the weight."""
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: False)
    monkeypatch.setattr(
        cpu_linear, "WIDEN_BLOCK_BYTES", 4 * 96 * 3000
    )  # 2730 rows a block: 2800 is not a multiple
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(2800, 96, generator=generator).to(dtype)
    bias = torch.randn(2800, generator=generator).to(dtype)
    for rows in (1, 2, 40):
        check(torch.randn(rows, 96, generator=generator).to(dtype), weight, bias)


def test_large_weights(monkeypatch):
    """The vocabulary projection's shape (5 MB here): one row through oneDNN, a few rows in transposed blocks
    (more weight rows than one block, not a multiple of it), many rows through oneDNN."""
    monkeypatch.setattr(cpu_linear, "TRANSPOSED_BLOCK_ROWS", 4096)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(20000, 64, generator=generator)
    assert weight.numel() * 4 >= cpu_linear.SMALL_WEIGHT_BYTES
    for rows in (1, 4, 16):
        check(torch.randn(rows, 64, generator=generator), weight)


def test_leading_dimensions_and_module():
    generator = torch.Generator().manual_seed(2)
    layer = Linear(96, 2800)
    x = torch.randn(3, 17, 96, generator=generator)  # 51 rows: the oneDNN path
    check(x, layer.weight.detach(), layer.bias.detach())
    assert torch.equal(layer(x), linear(x, layer.weight, layer.bias))
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_without_onednn_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_fp32_available", lambda: False)
    generator = torch.Generator().manual_seed(3)
    check(torch.randn(64, 96, generator=generator), torch.randn(2800, 96, generator=generator))


def test_small_weights_take_f_linear():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(128, 96, generator=generator)
    assert weight.numel() * 4 < cpu_linear.SMALL_WEIGHT_BYTES
    for rows in (1, 4, 16):
        x = torch.randn(rows, 96, generator=generator)
        assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_gradients_flow_where_grad_is_enabled():
    """Training or a forward outside no_grad keeps autograd: F.linear, with the same values."""
    generator = torch.Generator().manual_seed(6)
    layer = Linear(96, 2800)
    x = torch.randn(16, 96, generator=generator, requires_grad=True)
    out = layer(x)
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        check(x.detach(), layer.weight.detach(), layer.bias.detach())


def test_transposed_weight_view_is_served():
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(96, 2800, generator=generator).t()  # not contiguous
    with torch.no_grad():
        check(torch.randn(16, 96, generator=generator), weight)


@pytest.mark.parametrize("shape", [(0, 96), (2, 0, 96)])
def test_no_rows(shape):
    weight = torch.randn(2800, 96)
    assert linear(torch.empty(shape), weight).shape == (*shape[:-1], 2800)
