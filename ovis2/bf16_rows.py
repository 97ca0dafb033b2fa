"""Products of bf16 rows (decode steps, prefill, the vision tower) on CPUs without bf16 instructions (AVX2 and FMA
only).

There torch's bf16 products are emulated (~16 GFLOP/s for more than one row) and the fp32 path needs the weight
widened to fp32 on every call: measured on AMD Zen 3 with the Ovis2-1B shapes, a 16-row decode step took 477 ms
in bf16 against 258 ms in fp32 (196-208 ms with this kernel). `kernels/bf16_rows_avx2.c` reads the plain bf16
weight once for up to 128 rows and sums in fp32, so bf16 weights cost half fp32's bytes at one row and fp32's
arithmetic from 9 rows on (Zen 3: ~140 GFLOP/s at 16 rows, 150-170 from 51 rows, the fp32 FMA peak ~180; oneDNN's
fp32 product over weight blocks widened in PyTorch 80-160: 1.05-1.9x at 64-2048 rows). Compiled once with the
system's C compiler (native_build), loaded with ctypes; without a compiler or AVX2, with
`OVIS2_NATIVE_BF16_ROWS=0`, or when its self-test disagrees with float64, `cpu_linear` keeps its own paths.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from . import native_build

SOURCE = native_build.KERNELS / "bf16_rows_avx2.c"
SIGNATURES = {
    "bf16_rows_product": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], ctypes.c_int),
}


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes x @ weight.T + bias: one or more CPU bf16 rows of the weight's width, a
    contiguous non-empty 2-d bf16 weight, a bias of one value per output or none, nothing autograd watches, and
    the kernel built here; anything else is F.linear's."""
    if _refusal(x, weight, bias) is not None or native_build.autograd_sees(x, weight, bias):
        return False
    return kernel_library() is not None


def computed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias, [rows, in] -> [rows, out] bf16, where `takes` is true; None elsewhere (the dispatch's
    one call: the checks run once)."""
    return _compute(kernel_library(), x, weight, bias) if takes(x, weight, bias) else None


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, [rows, in] -> [rows, out] bf16, for what `takes` accepts (ValueError otherwise)."""
    return _run(kernel_library(), x, weight, bias)


def _refusal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernel, which reads raw pointers, cannot be handed these; None when it can."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors):
        return "the few-row bf16 kernel takes CPU bf16 tensors"
    if weight.dim() != 2 or not weight.is_contiguous() or weight.numel() == 0:
        return "the few-row bf16 kernel takes a contiguous non-empty 2-d weight"
    if x.shape[:-1].numel() < 1 or x.shape[-1] != weight.shape[1]:
        return f"the few-row bf16 kernel takes rows of {weight.shape[1]}, not {tuple(x.shape)}"
    if bias is not None and bias.shape != weight.shape[:1]:
        return f"bias of shape {tuple(bias.shape)} for {weight.shape[0]} outputs"
    return None


def _run(library: ctypes.CDLL, x, weight, bias) -> torch.Tensor:
    refusal = _refusal(x, weight, bias)
    if refusal is not None:
        raise ValueError(refusal)
    return _compute(library, x, weight, bias)


def _compute(library: ctypes.CDLL, x, weight, bias) -> torch.Tensor:
    """The kernel's call, for inputs `_refusal` passed."""
    rows, (out_features, in_features) = x.shape[:-1].numel(), weight.shape
    x = x.reshape(rows, in_features).contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(rows, out_features, dtype=torch.bfloat16, device="cpu")
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
        raise MemoryError(f"no memory for the bf16 kernel's {rows} rows of {in_features} in fp32")
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
    """Rows streamed (1, 2, 3, 8) and through transposed panels (9, 13, and 130: two blocks of rows), with and
    without a bias, over a weight with both edges (n % 16, k % 8) and more than one block of inputs (k > 256)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(130, 1101, generator=generator).to(torch.bfloat16)
    bias = torch.randn(130, generator=generator).to(torch.bfloat16)
    for rows in (1, 2, 3, 8, 9, 13, 130):
        x = torch.randn(rows, 1101, generator=generator).to(torch.bfloat16)
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
