"""Products of a few bf16 rows (decode steps: 1-16) on CPUs without bf16 instructions (AVX2 and FMA only).

There torch's bf16 products are emulated (~1 GFLOP/s for more than one row) and the fp32 path needs the weight
widened to fp32 on every call: measured on AMD Zen 3 with the Ovis2-1B shapes, a 16-row decode step took 477 ms
in bf16 against 258 ms in fp32. `kernels/bf16_rows_avx2.c` reads the plain bf16 weight once for all the rows and
sums in fp32, so bf16 weights cost half fp32's bytes at one row and fp32's arithmetic at 16. Compiled once with
the system's C compiler (native_build), loaded with ctypes; without a compiler or AVX2, with
`OVIS2_NATIVE_BF16_ROWS=0`, or when its self-test disagrees with float64, `cpu_linear` keeps its own paths.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from . import native_build

SOURCE = native_build.KERNELS / "bf16_rows_avx2.c"
MAX_ROWS = 16  # beyond this (prefill, the vision tower) oneDNN's fp32 product over widened blocks is faster
SIGNATURES = {
    "bf16_rows_product": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], ctypes.c_int),
}


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes x @ weight.T + bias: 1..MAX_ROWS bf16 rows, a contiguous 2-d bf16 weight."""
    rows = x.shape[:-1].numel()
    if not 1 <= rows <= MAX_ROWS or weight.dim() != 2 or not weight.is_contiguous():
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return native_build.kernel_may_take(*tensors) and kernel_library() is not None


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, [rows, in] -> [rows, out] bf16; the caller checked `takes`."""
    return _run(kernel_library(), x, weight, bias)


def _run(library: ctypes.CDLL, x, weight, bias) -> torch.Tensor:
    rows, (out_features, in_features) = x.shape[:-1].numel(), weight.shape
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} outputs")
    x = x.reshape(rows, in_features).contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    status = library.bf16_rows_product(
        weight.data_ptr(),
        x.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        rows,
        out_features,
        in_features,
        native_build.threads_for(out_features // 4 or 1),
    )
    if status != 0:
        raise MemoryError(f"the few-row bf16 kernel could not take {rows} rows of {in_features}")
    return out


@cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot or should not run here (native_build.checked_library)."""
    return native_build.checked_library(
        SOURCE,
        SIGNATURES,
        agrees_with_float64,
        "OVIS2_NATIVE_BF16_ROWS",
        "the few-row bf16 kernel for AVX2",
        cpu_has=native_build.has_avx2,
        flags=native_build.AVX2_FLAGS,
    )


def agrees_with_float64(library: ctypes.CDLL) -> bool:
    """1, 2, 3 and 7 rows, with and without a bias, over a weight whose shape has both edges (n % 4, k % 8)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(130, 101, generator=generator).to(torch.bfloat16)
    bias = torch.randn(130, generator=generator).to(torch.bfloat16)
    for rows in (1, 2, 3, 7):
        x = torch.randn(rows, 101, generator=generator).to(torch.bfloat16)
        for b in (None, bias):
            if not within_product_bound(_run(library, x, weight, b), x, weight, b):
                return False
    return True


def within_product_bound(out, x, weight, bias) -> bool:
    """`out` is the float64 x @ weight.T + bias within a reordered fp32 sum's error (k ulps of sum |x w|) and one
    bf16 rounding of the result."""
    expected = torch.nn.functional.linear(
        x.double(), weight.double(), None if bias is None else bias.double()
    )
    magnitude = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = (x.shape[-1] + 1) * torch.finfo(torch.float32).eps * magnitude
    bound = bound + torch.finfo(torch.bfloat16).eps * expected.abs()
    return bool(((out.double() - expected).abs() <= bound).all())
