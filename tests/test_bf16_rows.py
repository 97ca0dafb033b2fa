"""The bf16 rows kernel for CPUs without bf16 instructions (ovis2/bf16_rows.py) against the float64 product: every
register layout and blocks of rows, the weight's edges (out % 16, in % 8), a bias, NaN, and cpu_linear's dispatch
to it."""

from __future__ import annotations

import pytest
import torch

from ovis2 import bf16_rows, cpu_linear

from .linear_bounds import assert_near_reference

pytestmark = pytest.mark.skipif(
    bf16_rows.kernel_library() is None, reason="no C compiler or no AVX2 here: the kernel cannot run"
)


# Every register layout (1-8 streamed, from 9 transposed panels met 6 rows at a time), the 6-row tiles' leftovers,
# one block of rows (up to 128) and several (129: 65 + 64; 300: 100 x 3).
ROW_COUNTS = [*range(1, 17), 17, 31, 32, 33, 64, 127, 128, 129, 300]


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize(
    "shape", [(64, 96), (67, 101), (3, 9), (67, 1100), (64, 1024)]
)  # n % 16, k % 8, k > 256: several blocks of inputs
def test_matches_float64(rows, shape):
    generator = torch.Generator().manual_seed(rows * 1000 + shape[0])
    weight = torch.randn(*shape, generator=generator).to(torch.bfloat16)
    bias = torch.randn(shape[0], generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, shape[1], generator=generator).to(torch.bfloat16)
    assert bf16_rows.takes(x, weight, bias)
    for b in (None, bias):
        out = bf16_rows.product(x, weight, b)
        assert out.shape == (rows, shape[0]) and out.dtype == torch.bfloat16
        assert_near_reference(out, x, weight, b)


def test_one_rounding_not_two():
    """64 + 64 * 0.25 = 80 in fp32 sums rounded once; summed in bf16 each 64 + 0.25 would tie back to 64."""
    weight = torch.full((4, 65), 0.25, dtype=torch.bfloat16)
    weight[:, 0] = 64.0
    x = torch.ones(1, 65, dtype=torch.bfloat16)
    assert bf16_rows.product(x, weight, None).float().eq(80.0).all()


@pytest.mark.parametrize("rows", [2, 16])  # streamed, panels
def test_nan_and_infinity_propagate(rows):
    weight = torch.ones(40, 16, dtype=torch.bfloat16)
    x = torch.ones(rows, 16, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    out = bf16_rows.product(x, weight, None)
    assert out[0].isnan().all() and out[1].isposinf().all() and out[2:].eq(16.0).all()


def test_rounds_to_nearest_even():
    """1 + 2^-8 lies halfway between bf16's 1 and 1 + 2^-7: nearest even gives 1; 1 + 3 * 2^-8 gives 1 + 2^-6."""
    weight = torch.ones(4, 2, dtype=torch.bfloat16)
    x = torch.tensor([[1.0, 2**-8], [1.0, 3 * 2**-8]], dtype=torch.bfloat16)
    out = bf16_rows.product(x, weight, None).float()
    assert out[0].eq(1.0).all() and out[1].eq(1 + 2**-6).all()


def test_refuses_what_it_does_not_compute():
    weight = torch.randn(8, 16).to(torch.bfloat16)
    many = torch.randn(300, 16).to(torch.bfloat16)
    assert bf16_rows.takes(many[:2], weight, torch.zeros(8, dtype=torch.bfloat16))
    assert bf16_rows.takes(many, weight, None)
    assert not bf16_rows.takes(many[:0], weight, None)
    assert not bf16_rows.takes(many[:2].float(), weight.float(), None)
    assert not bf16_rows.takes(many[:2], weight.t().contiguous().t(), None)
    assert not bf16_rows.takes(many[:2, :15], weight, None)  # F.linear raises its own shape error
    assert not bf16_rows.takes(
        many[:2], weight, torch.zeros(1, dtype=torch.bfloat16)
    )  # broadcast: F.linear's
    assert not bf16_rows.takes(many[:2, :0], weight[:, :0].contiguous(), None)
    assert not bf16_rows.takes(many[:2], weight.requires_grad_(), None)


def test_a_wrong_call_raises_instead_of_reading_wild_pointers():
    weight = torch.randn(8, 16).to(torch.bfloat16)
    x = torch.randn(2, 16).to(torch.bfloat16)
    for args in (
        (x.float(), weight, None),
        (x, weight.float(), None),
        (x[:, :15], weight, None),
        (x, weight.t(), None),
        (x[:0], weight, None),
        (x, weight, torch.zeros(7, dtype=torch.bfloat16)),
    ):
        with pytest.raises(ValueError):
            bf16_rows.product(*args)


def test_switched_off_or_built_for_the_wrong_cpu_it_is_not_used(monkeypatch):
    """OVIS2_NATIVE_BF16_ROWS=0 and a CPU without AVX2: no kernel, cpu_linear's own paths. Where it builds, it is
    built with the AVX2 flags (AVX-512 ones would die with SIGILL on an AVX2-only CPU)."""
    flags_used = []
    real_compiled = bf16_rows.native_build.compiled
    monkeypatch.setattr(
        bf16_rows.native_build,
        "compiled",
        lambda source, flags: flags_used.append(flags) or real_compiled(source, flags),
    )
    try:
        bf16_rows.kernel_library.cache_clear()
        assert bf16_rows.kernel_library() is not None and flags_used == [bf16_rows.native_build.AVX2_FLAGS]
        monkeypatch.setenv("OVIS2_NATIVE_BF16_ROWS", "0")
        bf16_rows.kernel_library.cache_clear()
        assert bf16_rows.kernel_library() is None
        monkeypatch.delenv("OVIS2_NATIVE_BF16_ROWS")
        monkeypatch.setattr(bf16_rows.native_build, "has_avx2", lambda: False)
        bf16_rows.kernel_library.cache_clear()
        assert bf16_rows.kernel_library() is None
        x, weight = torch.randn(3, 16).to(torch.bfloat16), torch.randn(8, 16).to(torch.bfloat16)
        assert not bf16_rows.takes(x, weight, None)
        monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: False)
        assert_near_reference(cpu_linear.linear(x, weight), x, weight)
    finally:
        monkeypatch.undo()
        bf16_rows.kernel_library.cache_clear()


def test_dispatch_takes_the_kernel_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: False)
    bf16_rows.kernel_library()  # built (and self-tested) before the count starts
    calls = []
    real = bf16_rows._compute
    monkeypatch.setattr(bf16_rows, "_compute", lambda *args: calls.append(1) or real(*args))
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(600, 96, generator=generator).to(torch.bfloat16)
    for rows, expected_calls in ((1, 1), (16, 2), (128, 3), (1024, 4)):
        x = torch.randn(2, rows, 96, generator=generator).to(torch.bfloat16)
        out = cpu_linear.linear(x[0], weight)
        assert_near_reference(out, x[0], weight)
        assert len(calls) == expected_calls
