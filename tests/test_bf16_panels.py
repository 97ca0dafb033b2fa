"""bf16_rows' panel layout (weights laid out once as 16-row panels, input by input) against the float64 product:
the layout and its way back, every register layout of the kernel and blocks of rows, the weight's edges (out % 16,
odd in), a bias, NaN, and the calls it refuses."""

from __future__ import annotations

import pytest
import torch

from ovis2 import bf16_rows

from .linear_bounds import assert_near_reference
from .test_bf16_rows import ROW_COUNTS

pytestmark = pytest.mark.skipif(
    bf16_rows.kernel_library() is None, reason="no C compiler or no AVX2 here: the kernel cannot run"
)


def random_bf16(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(64, 96), (67, 101), (3, 9), (1, 1)])
def test_layout_and_back(shape):
    weight = random_bf16(*shape, seed=shape[0])
    panels = bf16_rows.panels_of(weight)
    count = -(-shape[0] // 16)
    assert panels.data.shape == (count, shape[1], 16) and panels.out_features == shape[0]
    for row in range(
        shape[0]
    ):  # weight row r: panel r // 16, lane r % 8, its low half below 8, else its high
        position = 2 * (row % 16 % 8) + row % 16 // 8
        assert torch.equal(panels.data[row // 16, :, position], weight[row])
    last = shape[0] - 16 * (count - 1)  # rows of the last panel
    padding = [2 * (row % 8) + row // 8 for row in range(last, 16)]
    assert panels.data[-1][:, padding].eq(0).all()
    assert torch.equal(panels.dense(), weight)


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("shape", [(64, 96), (67, 101), (3, 9), (67, 1100), (64, 1024)])  # k > 256: blocks
def test_matches_float64(rows, shape):
    seed = rows * 1000 + shape[0]
    weight, bias = random_bf16(*shape, seed=seed), random_bf16(shape[0], seed=seed + 1)
    x = random_bf16(rows, shape[1], seed=seed + 2)
    panels = bf16_rows.panels_of(weight)
    for b in (None, bias):
        out = bf16_rows.panels_product(x, panels, b)
        assert out.shape == (rows, shape[0]) and out.dtype == torch.bfloat16
        assert_near_reference(out, x, weight, b)


@pytest.mark.parametrize("rows", [2, 16])  # few rows, 6 at a time
def test_nan_and_infinity_propagate(rows):
    panels = bf16_rows.panels_of(torch.ones(40, 16, dtype=torch.bfloat16))
    x = torch.ones(rows, 16, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    out = bf16_rows.panels_product(x, panels, None)
    assert out[0].isnan().all() and out[1].isposinf().all() and out[2:].eq(16.0).all()


def test_refuses_what_it_does_not_compute():
    weight = random_bf16(40, 24, seed=0)
    panels = bf16_rows.panels_of(weight)
    x = random_bf16(3, 24, seed=1)
    wrong = [
        (x[:, :20], panels, None),  # another width
        (x.float(), panels, None),  # another dtype
        (x, panels, random_bf16(39, seed=2)),  # a bias of the wrong length
        (x, bf16_rows.PanelWeight(panels.data, 49), None),  # more outputs than its panels hold
        (x, bf16_rows.PanelWeight(panels.data, 32), None),  # a whole panel left over
        (x, bf16_rows.PanelWeight(panels.data.view(3, 48, 8), 40), None),  # not 16 wide
        (
            x,
            bf16_rows.PanelWeight(panels.data.transpose(1, 2).contiguous().transpose(1, 2), 40),
            None,
        ),  # strided
    ]
    for args in wrong:
        assert bf16_rows.panels_computed(*args) is None
        with pytest.raises(ValueError):
            bf16_rows.panels_product(*args)
    watched = x.clone().requires_grad_(True)
    assert bf16_rows.panels_computed(watched, panels, None) is None  # autograd's: F.linear
    assert bf16_rows.panels_computed(x, panels, None) is not None
