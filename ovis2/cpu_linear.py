"""Linear layers on CPU, each product computed the way torch runs it fastest for its number of rows.

`F.linear` on CPU is MKL's sgemm. Measured with torch 2.13 on AMD EPYC (Zen 3, AVX2, 2 cores), on the Ovis2-1B
shapes, the same fp32 product runs 1.3-3.5x faster for 2-7 rows computed as `weight @ x.T`, and oneDNN's inner
product is faster than both for one row (a decode step's GEMV streams at 1.3-2x MKL's bandwidth) and from 8 rows
on (1.2-2.8x: decode batches, prefill, the vision tower). A CPU without bf16 instructions (AVX2 only) runs a bf16
product of more than one row at ~16 GFLOP/s; there the weight is widened to fp32 a cache-sized block of rows at a
time and the fp32 path runs (accumulating in fp32, as a native bf16 kernel does). `python -m
bench.bench_cpu_linear` prints the ratios on the machine at hand. CUDA tensors, and any dtype but fp32/bf16, take
`F.linear`.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

TRANSPOSED_MAX_ROWS = 7  # fp32, 2..7 rows: weight @ x.T; one row or 8 and more: oneDNN
SMALL_WEIGHT_BYTES = 1 << 20  # a weight this small (Qwen2's k/v): F.linear, oneDNN's call costs more
TRANSPOSED_BLOCK_ROWS = 8192  # weight rows per block of the transposed product
WIDEN_BLOCK_BYTES = 2 << 20  # fp32 bytes of one widened weight block: stays in L2/L3


@cache
def onednn_fp32_available() -> bool:
    return _onednn_works(torch.float32)


@cache
def native_bf16_matmul() -> bool:
    """True when oneDNN computes bf16 itself (AVX512-BF16, AMX, ...); False on AVX2-only CPUs."""
    return _onednn_works(torch.bfloat16)


def _onednn_works(dtype: torch.dtype) -> bool:
    try:
        x, w = torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):  # absent, unsupported, or another signature
        return False
    return bool(torch.equal(out.float(), torch.full((2, 4), 8.0)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), any leading dimensions."""
    rows = x.shape[:-1].numel()
    if rows == 0 or not _dispatchable(x, weight, bias):
        return F.linear(x, weight, bias)
    flat_x = x.reshape(rows, x.shape[-1])
    if x.dtype == torch.float32:
        flat = _fp32_rows(flat_x, weight, bias)
    elif rows > 1 and not native_bf16_matmul():
        flat = _widened(flat_x, weight, bias)
    else:  # bf16: one row streams half the bytes of a widened one; or the CPU computes bf16 itself
        return F.linear(x, weight, bias)
    return flat.view(*x.shape[:-1], weight.shape[0])


def _dispatchable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU, fp32 or bf16, a contiguous weight, and nothing to differentiate (oneDNN's op has no gradient)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return weight.is_contiguous()


def _fp32_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.numel() * 4 < SMALL_WEIGHT_BYTES:
        return F.linear(x, weight, bias)
    if 1 < x.shape[0] <= TRANSPOSED_MAX_ROWS:
        return _transposed(x, weight, bias)
    if onednn_fp32_available():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(weight @ x.T).T in blocks of weight rows, so each block's transpose back happens in cache."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    columns = x.t()
    for start in range(0, weight.shape[0], TRANSPOSED_BLOCK_ROWS):
        out[:, start : start + TRANSPOSED_BLOCK_ROWS].copy_(
            (weight[start : start + TRANSPOSED_BLOCK_ROWS] @ columns).t()
        )
    return out.add_(bias) if bias is not None else out


def _widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 in and out, fp32 inside: one block of weight rows widened at a time."""
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    block = max(1, WIDEN_BLOCK_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], block):
        stop = min(start + block, weight.shape[0])
        part_bias = bias[start:stop].float() if bias is not None else None
        out[:, start:stop] = _fp32_rows(x32, weight[start:stop].float(), part_bias)
    return out


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose CPU forward takes `linear`'s dispatch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
