"""ovis2.cpu_linear against F.linear: every path its dispatch takes (one row, the transposed product, oneDNN, bf16
widened to fp32), with bias, leading dimensions and the vocabulary projection's block edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovis2 import cpu_linear
from ovis2.cpu_linear import Linear, linear

from .linear_bounds import assert_near_reference


@pytest.fixture(autouse=True)
def _every_path(monkeypatch):
    """The AMD rule (oneDNN for one row, the transposed product for 2-7) on every CPU, so each path is checked
    wherever the tests run; Intel's F.linear for few rows has its own test."""
    monkeypatch.setattr(cpu_linear, "mkl_handles_few_rows", lambda: False)


def check(x, weight, bias=None):
    out = linear(x, weight, bias)
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == x.dtype and out.is_contiguous()
    assert_near_reference(out, x, weight, bias)


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
        cpu_linear.bf16_rows, "takes", lambda *args: False
    )  # test_bf16_rows checks the kernel
    monkeypatch.setattr(
        cpu_linear, "WIDEN_BLOCK_BYTES", 4 * 96 * 3000
    )  # 2730 rows a block: 2800 is not a multiple
    monkeypatch.setattr(cpu_linear, "MANY_ROWS_WIDEN_BLOCK_BYTES", 4 * 96 * 1000)  # 1000 rows a block
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(2800, 96, generator=generator).to(dtype)
    bias = torch.randn(2800, generator=generator).to(dtype)
    for rows in (1, 2, 40, cpu_linear.MANY_ROWS):
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


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_few_rows_take_f_linear_where_mkl_handles_them(monkeypatch, rows):
    monkeypatch.setattr(cpu_linear, "mkl_handles_few_rows", lambda: True)
    generator = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(2800, 96, generator=generator), torch.randn(rows, 96, generator=generator)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_the_cpu_vendor_is_read(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    assert cpu_linear._cpu_vendor(cpuinfo) == "GenuineIntel"
    assert cpu_linear._cpu_vendor(tmp_path / "absent") == ""


@pytest.mark.parametrize("emulated", [False, True])
def test_matmul_matches_reference(monkeypatch, emulated):
    """a @ b with b: [K, N] (the visual table's soft lookup): where bf16 is emulated (forced here), fp32 blocks of K,
    3 of them and a partial one; the result is the float64 product within the reordered-sum bound."""
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: not emulated)
    monkeypatch.setattr(cpu_linear, "WIDEN_BLOCK_BYTES", 4 * 48 * 100)  # 100 rows of b a block; K = 350
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 350, generator=generator).to(torch.bfloat16)
    b = torch.randn(350, 48, generator=generator).to(torch.bfloat16)
    blocked = []
    real = cpu_linear.widen_block_bytes
    monkeypatch.setattr(cpu_linear, "widen_block_bytes", lambda rows: blocked.append(rows) or real(rows))
    out = cpu_linear.matmul(a, b)
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    assert_near_reference(out, a, b.t())
    assert blocked == ([10] if emulated else [])  # the fp32 blocks only where bf16 is emulated
    with pytest.raises(RuntimeError):  # a K mismatch is a@b's error, not a silently dropped column
        cpu_linear.matmul(a[..., :349], b)


def test_emulates_bf16_only_for_cpu_bf16(monkeypatch):
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: False)
    assert cpu_linear.emulates_bf16(torch.ones(2, dtype=torch.bfloat16))
    assert not cpu_linear.emulates_bf16(torch.ones(2))
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: True)
    assert not cpu_linear.emulates_bf16(torch.ones(2, dtype=torch.bfloat16))
