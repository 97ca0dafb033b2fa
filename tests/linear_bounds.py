"""How far two correct computations of one linear product may differ."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reordered_product_bound(x: torch.Tensor, weight: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How far a correct x @ weight.T may be from another one, per element: a float32 sum of K products taken in
    another order moves by at most K ulps of sum |x * w| (the classic bound); a bfloat16 result adds one rounding
    of the output."""
    magnitude = x.float().abs() @ weight.float().abs().t()
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * magnitude
    if x.dtype != torch.float32:
        bound = bound + torch.finfo(x.dtype).eps * expected.abs()
    return bound


def assert_near_reference(out, x, weight, bias=None) -> None:
    """`out` is x @ weight.T + bias within the reordered-sum bound of the float64 product, plus the bias's rounding."""
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    flat_x = x.reshape(-1, x.shape[-1])
    bound = reordered_product_bound(flat_x, weight, expected.reshape(flat_x.shape[0], -1).float())
    error = (out.double() - expected).reshape(bound.shape).abs()
    final_rounding = torch.finfo(torch.float32).eps * expected.reshape(bound.shape).abs()
    assert (error <= bound.double() + final_rounding).all()
