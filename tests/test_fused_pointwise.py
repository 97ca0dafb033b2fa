"""The one-pass bf16 kernels for RMSNorm, SiLU-and-multiply and the visual head's LayerNorm + softmax
(ovis2.fused_pointwise): the PyTorch composites' values within the rounding they may differ by, on the shapes the
models use (rows with tails, one row, the halves of a fused gate/up product), and the composites wherever the
kernels cannot or should not run.

The kernels need a CPU with AVX512-BF16 and a C compiler (RMSNorm and SiLU-and-multiply also build for AVX2); the
fallbacks are checked everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovis2 import fused_pointwise

from .native_kernels import decided_anew, loaded_or_skip


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    with decided_anew(fused_pointwise, monkeypatch, tmp_path):
        yield monkeypatch


@pytest.fixture(scope="module")
def library():
    return loaded_or_skip(fused_pointwise, "the pointwise kernels")


def bf16(*shape, scale=1.0, seed=0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def head_norm(width: int, seed: int = 0) -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(width).to(torch.bfloat16).requires_grad_(False)
    norm.weight.copy_(bf16(width, seed=seed) * 0.5 + 1)
    norm.bias.copy_(bf16(width, seed=seed + 1) * 0.5)
    return norm


@pytest.mark.parametrize("shape", [(2, 1024, 1024), (1, 1536), (3, 7, 200), (5, 17)])
def test_rms_norm_is_the_composite_within_its_two_roundings(library, shape):
    x, weight = bf16(*shape, scale=3.0, seed=1), bf16(shape[-1], seed=2)
    with torch.inference_mode():
        got = fused_pointwise.rms_norm(x, weight, 1e-6)
        expected = fused_pointwise.reference_rms_norm(x, weight, 1e-6)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert fused_pointwise.within_bf16_roundings(got, expected)
    assert (got == expected).float().mean() > 0.99  # the same roundings, bar a reordered sum's rare flip


@pytest.fixture(scope="module")
def avx2_library():
    library = fused_pointwise.avx2_library()
    if library is None:
        pytest.skip("the AVX2 pointwise kernels need AVX2 and a C compiler")
    return library


@pytest.fixture(scope="module", params=["avx512_bf16", "avx2"])
def silu_library(request):
    """Each build of SiLU-and-multiply this CPU runs."""
    return request.getfixturevalue("library" if request.param == "avx512_bf16" else "avx2_library")


@pytest.mark.parametrize("shape", [(2, 1024, 1024), (1, 1536), (3, 7, 203), (5, 17), (2, 5)])
def test_the_avx2_rms_norm_is_the_composite_within_its_two_roundings(avx2_library, shape):
    x, weight = bf16(*shape, scale=3.0, seed=1), bf16(shape[-1], seed=2)
    if x.numel() > x.shape[-1]:
        x.view(-1, shape[-1])[0, 0] = float("nan")  # that row is NaN in both
    with torch.inference_mode():
        got = fused_pointwise._kernel_rms_norm(avx2_library, x, weight, 1e-6)
        expected = fused_pointwise.reference_rms_norm(x, weight, 1e-6)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert fused_pointwise.within_bf16_roundings(got[finite], expected[finite])
    assert (got[finite] == expected[finite]).float().mean() > 0.99


def test_without_avx512_bf16_rms_norm_takes_the_avx2_kernel(avx2_library, monkeypatch):
    monkeypatch.setattr(fused_pointwise, "kernel_library", lambda: None)
    calls = []
    real = fused_pointwise._kernel_rms_norm
    monkeypatch.setattr(
        fused_pointwise, "_kernel_rms_norm", lambda *args: calls.append(args[0]) or real(*args)
    )
    x, weight = bf16(4, 96, seed=6), bf16(96, seed=7)
    with torch.inference_mode():
        got = fused_pointwise.rms_norm(x, weight, 1e-6)
        fused_pointwise.rms_norm(x.float(), weight.float(), 1e-6)  # fp32: the composite
    assert calls == [avx2_library]
    assert fused_pointwise.within_bf16_roundings(got, fused_pointwise.reference_rms_norm(x, weight, 1e-6))


def test_without_avx512_bf16_silu_mul_takes_the_avx2_kernel(avx2_library, monkeypatch):
    monkeypatch.setattr(fused_pointwise, "kernel_library", lambda: None)
    calls = []
    real = fused_pointwise._kernel_silu_mul
    monkeypatch.setattr(
        fused_pointwise, "_kernel_silu_mul", lambda *args: calls.append(args[0]) or real(*args)
    )
    fused = bf16(64, 2 * fused_pointwise.SILU_KERNEL_MIN_VALUES // 64, scale=4.0, seed=8)
    gate, up = fused.chunk(2, dim=-1)  # the halves of one product, as the MLP hands them
    with torch.inference_mode():
        got = fused_pointwise.silu_mul(gate, up)
        fused_pointwise.silu_mul(gate.float(), up.float())  # fp32: the composite
    assert calls == [avx2_library]
    assert fused_pointwise.within_bf16_roundings(got, fused_pointwise.reference_silu_mul(gate, up))


def kernel_silu_mul(library, gate, up):
    """The kernel itself, below the size where silu_mul() would hand it the inputs."""
    return fused_pointwise._kernel_silu_mul(library, gate, up, fused_pointwise._row_stride(gate))


@pytest.mark.parametrize("shape", [(2, 1024, 2816), (1, 8960), (3, 5, 200), (37,)])
def test_silu_mul_is_the_composite_within_its_two_roundings(silu_library, shape):
    gate, up = bf16(*shape, scale=4.0, seed=3), bf16(*shape, scale=2.0, seed=4)
    with torch.inference_mode():
        got = kernel_silu_mul(silu_library, gate, up)
        expected = fused_pointwise.reference_silu_mul(gate, up)
    assert got.shape == expected.shape
    assert fused_pointwise.within_bf16_roundings(got, expected)
    assert (got == expected).float().mean() > 0.99


def test_silu_mul_reads_the_two_halves_of_a_fused_product_in_place(silu_library):
    fused = bf16(2, 9, 2 * 200, scale=4.0, seed=5)
    gate, up = fused.chunk(2, dim=-1)
    with torch.inference_mode():
        got = kernel_silu_mul(silu_library, gate, up)
        expected = fused_pointwise.reference_silu_mul(gate.contiguous(), up.contiguous())
    assert got.is_contiguous() and fused_pointwise.within_bf16_roundings(got, expected)


def test_silu_mul_of_extreme_values_is_the_composite(silu_library):
    """exp overflows and underflows where PyTorch's does: silu(-100) is -0, silu(100) is 100."""
    gate = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0, 1e4] * 2).to(
        torch.bfloat16
    )
    up = torch.ones_like(gate)
    with torch.inference_mode():
        got = kernel_silu_mul(silu_library, gate, up)
    assert fused_pointwise.within_bf16_roundings(got, fused_pointwise.reference_silu_mul(gate, up))
    assert torch.isfinite(got).all()


class RecordingLibrary:
    def __init__(self):
        self.calls = []

    def silu_mul_bf16(self, *args):
        self.calls.append(args[3:5])  # rows, cols


def test_silu_mul_hands_the_kernel_large_inputs_only(monkeypatch):
    """Decode-sized inputs cost more through the kernel's call than they save: PyTorch's ops take them."""
    fake = RecordingLibrary()
    monkeypatch.setattr(fused_pointwise, "kernel_library", lambda: fake)
    small = bf16(16, 4864, seed=20)
    large = bf16(64, fused_pointwise.SILU_KERNEL_MIN_VALUES // 64, seed=21)
    with torch.inference_mode():
        assert torch.equal(
            fused_pointwise.silu_mul(small, small), fused_pointwise.reference_silu_mul(small, small)
        )
        fused_pointwise.silu_mul(large, large)
    assert fake.calls == [(64, large.shape[1])]


@pytest.mark.parametrize("shape", [(2, 256, 65531), (1, 1, 37), (3, 200)])
def test_layer_norm_softmax_is_the_composite_within_logit_rounding(library, shape):
    x, norm = bf16(*shape, scale=2.0, seed=6), head_norm(shape[-1], seed=7)
    with torch.inference_mode():
        got = fused_pointwise.layer_norm_softmax(x, norm)
        expected = fused_pointwise.reference_layer_norm_softmax(x, norm.weight, norm.bias, norm.eps)
        logits = F.layer_norm(x.float(), (shape[-1],), norm.weight.float(), norm.bias.float(), norm.eps)
    assert got.shape == expected.shape
    assert fused_pointwise.within_logit_rounding(got, expected, logits)
    sums = got.float().sum(-1)
    assert ((sums - 1).abs() <= 2**-7).all()  # each value rounded by at most 2^-8 of itself, twice over


def test_the_logit_bound_catches_a_missing_bias(library):
    x, norm = bf16(4, 300, scale=2.0, seed=8), head_norm(300, seed=9)
    with torch.inference_mode():
        got = fused_pointwise.layer_norm_softmax(x, norm)
        unbiased = fused_pointwise.reference_layer_norm_softmax(x, norm.weight, None, norm.eps)
        logits = F.layer_norm(x.float(), (300,), norm.weight.float(), None, norm.eps)
    assert not fused_pointwise.within_logit_rounding(got, unbiased, logits)


def test_the_self_test_passes_wherever_the_kernels_compile(library):
    assert fused_pointwise.agrees_with_pytorch(library)


def test_float32_and_autograd_take_the_composite():
    x, weight = torch.randn(4, 64), torch.randn(64)
    assert torch.equal(
        fused_pointwise.rms_norm(x, weight, 1e-6), fused_pointwise.reference_rms_norm(x, weight, 1e-6)
    )
    watched = bf16(64, seed=9).requires_grad_(True)
    out = fused_pointwise.rms_norm(bf16(4, 64, seed=8), watched, 1e-6)
    out.float().sum().backward()  # the composite kept the graph
    assert watched.grad is not None
    gate = bf16(64, 4096, seed=10).requires_grad_(True)  # large enough for the kernel
    product = fused_pointwise.silu_mul(gate, bf16(64, 4096, seed=11))
    assert product.grad_fn is not None
    scalar = torch.tensor(1.5)
    assert torch.equal(
        fused_pointwise.silu_mul(scalar, scalar), fused_pointwise.reference_silu_mul(scalar, scalar)
    )


def test_parameters_that_do_not_fit_take_the_composite():
    """The kernels read one parameter value per column: a weight of one value is the composite's (RMSNorm
    broadcasts it; LayerNorm refuses it with its own error), never read past its end."""
    x, weight = bf16(4, 64, seed=12), bf16(1, seed=13)
    norm = torch.nn.LayerNorm(64).to(torch.bfloat16).requires_grad_(False)
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)
    with torch.inference_mode():
        assert torch.equal(
            fused_pointwise.rms_norm(x, weight, 1e-6), fused_pointwise.reference_rms_norm(x, weight, 1e-6)
        )
        with pytest.raises(RuntimeError):
            fused_pointwise.layer_norm_softmax(x, norm)


def test_rows_the_kernel_cannot_walk_take_the_composite():
    """A transposed gate: each row strided, so the composite, with the same values."""
    gate, up = bf16(4096, 64, seed=12).t(), bf16(64, 4096, seed=13)  # large enough for the kernel
    with torch.inference_mode():
        got = fused_pointwise.silu_mul(gate, up)
    assert torch.equal(got, fused_pointwise.reference_silu_mul(gate, up))


def test_switched_off_means_no_kernel_and_the_composites_run(fresh_library):
    fresh_library.setenv("OVIS2_NATIVE_POINTWISE", "0")
    assert fused_pointwise.kernel_library() is None
    x, weight = bf16(3, 64, seed=14), bf16(64, seed=15)
    with torch.inference_mode():
        assert torch.equal(
            fused_pointwise.rms_norm(x, weight, 1e-6), fused_pointwise.reference_rms_norm(x, weight, 1e-6)
        )


def test_no_compiler_means_no_kernel(fresh_library, tmp_path):
    fresh_library.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert fused_pointwise.kernel_library() is None
    x, norm = bf16(2, 40, seed=16), head_norm(40)
    with torch.inference_mode():
        got = fused_pointwise.layer_norm_softmax(x, norm)
    assert torch.equal(got, fused_pointwise.reference_layer_norm_softmax(x, norm.weight, norm.bias, norm.eps))
