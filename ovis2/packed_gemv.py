"""One-row products over bf16 weights packed for oneDNN, computed by a small compiled kernel (AVX512-BF16).

A batch-1 decode step is one row times every weight of the model: it streams the weights once and should take
the memory's read time. oneDNN's product over its packed layout reads them at 15-22 GB/s on a 2-core Xeon with
AMX where a plain sum reads 21-23; `kernels/packed_gemv.c` reads the same packed buffer (no second copy of any
weight) at 23-30 GB/s (bench/RESULTS.md). It is compiled once with the system's C compiler into the cache
directory and loaded with ctypes; its OpenMP calls resolve to the libgomp torch has loaded, so both share one
thread pool. Without a compiler, without AVX512-BF16, with `OVIS2_NATIVE_GEMV=0`, for a layout the kernel does
not know, or when its self-test disagrees with oneDNN, products stay oneDNN's.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from . import native_build

SOURCE = native_build.KERNELS / "packed_gemv.c"
BLOCKS = (32, 64)  # output columns per block of the layouts the kernel reads (AB16b32a2b, AB16b64a2b)
INPUT_BLOCK = 32
SIGNATURES = {
    f"packed_gemv_bf16_{block}": (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int],
        None,
    )
    for block in BLOCKS
}


class OneRowProduct:
    """x @ weight.T + bias for one bf16 row, reading `packed` (kept alive here) in place."""

    def __init__(self, packed: torch.Tensor, kernel, out_features: int, in_features: int) -> None:
        self.packed, self.out_features, self.in_features = packed, out_features, in_features
        self._pointer = torch.ops.mkldnn.data_ptr(packed)
        self._kernel = kernel

    def accepts(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        one_row = x.shape[:-1].numel() == 1 and x.shape[-1] == self.in_features
        return one_row and x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.reshape(1, self.in_features).contiguous()
        bias = bias.contiguous() if bias is not None else None
        out = torch.empty(1, self.out_features, dtype=torch.bfloat16)
        self._kernel(
            self._pointer,
            x.data_ptr(),
            bias.data_ptr() if bias is not None else None,
            out.data_ptr(),
            self.out_features,
            self.in_features,
            torch.get_num_threads(),
        )
        return out


def one_row_product(packed: torch.Tensor, weight: torch.Tensor) -> OneRowProduct | None:
    """The kernel's product for `packed` (oneDNN's reorder of `weight`), or None where the kernel cannot read it:
    no kernel here, another dtype, or a layout other than the two it knows (checked against `weight` itself)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or kernel_library() is None:
        return None
    block = packed_block(packed, weight)
    if block is None:
        return None
    return OneRowProduct(packed, _kernel(kernel_library(), block), weight.shape[0], weight.shape[1])


def packed_block(packed: torch.Tensor, weight: torch.Tensor) -> int | None:
    """B where `packed` holds `weight` as blocks [N/B][K/32] of [16][B][2] values; None otherwise."""
    if packed.layout != torch._mkldnn or weight.shape[1] % INPUT_BLOCK:
        return None
    try:
        return _matching_block(packed, weight)
    except (AttributeError, RuntimeError):  # a torch without oneDNN's buffer accessors
        return None


def _matching_block(packed: torch.Tensor, weight: torch.Tensor) -> int | None:
    rows, columns = weight.shape
    if torch.ops.mkldnn._nbytes(packed) != weight.numel() * weight.element_size():
        return None  # padded
    raw = _raw_values(packed, weight.numel())
    for block in BLOCKS:
        if rows % block:
            continue
        blocked = raw.view(rows // block, columns // INPUT_BLOCK, 16, block, 2).permute(0, 3, 1, 2, 4)
        if torch.equal(blocked, weight.view(rows // block, block, columns // INPUT_BLOCK, 16, 2)):
            return block
    return None


def _raw_values(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The packed buffer's bf16 values in memory order (a view: valid while `packed` lives)."""
    buffer = (ctypes.c_uint16 * count).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(buffer, dtype=torch.bfloat16)


@cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot or should not run here (native_build.checked_library)."""
    return native_build.checked_library(
        SOURCE, SIGNATURES, agrees_with_onednn, "OVIS2_NATIVE_GEMV", "the one-row bf16 kernel"
    )


def _kernel(library: ctypes.CDLL, block: int):
    return getattr(library, f"packed_gemv_bf16_{block}")


def agrees_with_onednn(library: ctypes.CDLL) -> bool:
    """Both layouts, with and without a bias, on a product small enough to check in a millisecond."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 96, generator=generator).to(torch.bfloat16)
    bias = torch.randn(128, generator=generator).to(torch.bfloat16)
    x = torch.randn(1, 96, generator=generator).to(torch.bfloat16)
    for rows_hint in (1, 16):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        block = packed_block(packed, weight)
        if block is None:
            continue
        product = OneRowProduct(packed, _kernel(library, block), 128, 96)
        for b in (bias, None):
            expected = x.double() @ weight.double().T + (b.double() if b is not None else 0)
            error = (product(x, b).double() - expected).abs().max()
            if not error <= 2**-7 * expected.abs().max():  # bf16's own rounding of the result: 2^-8
                return False
    return True
