"""RMSNorm, SiLU-and-multiply and the visual head's LayerNorm + softmax as one pass each over bf16 rows.

PyTorch runs each as several ops on CPU, every one a full pass with a fresh fp32 or bf16 intermediate: in a
448x448 crop of Ovis2-1B's vision tower they took as long as half its matrix products (bench/RESULTS.md).
`kernels/pointwise.c` does each in one pass, rounding to bf16 where the composite does, so results match it up
to fp32 summation order and exp's last bits (one bf16 step per rounding; tests/test_fused_pointwise.py). It is
built like the one-row kernel (ovis2/native_build.py). The functions here take any input: the kernel computes
where it can (bf16 on a CPU with AVX512-BF16, no autograd, a compiler, `OVIS2_NATIVE_POINTWISE` not 0, its
self-test passed; RMSNorm and SiLU-and-multiply also on AVX2 CPUs, `kernels/pointwise_avx2.c`), the PyTorch
composite everywhere else.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from . import native_build

SOURCE = native_build.KERNELS / "pointwise.c"
AVX2_SOURCE = native_build.KERNELS / "pointwise_avx2.c"
_POINTER, _INT64, _FLOAT, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# One row of Ovis2-1B's 4864: 20 vs 7 us; 16 rows 49 vs 44 us; 2048 rows of 2816 (two crops) 1.7 vs 2.6 ms.
SILU_KERNEL_MIN_VALUES = 1 << 18
SIGNATURES = {
    "rms_norm_bf16": ([_POINTER] * 3 + [_INT64, _INT64, _FLOAT, _INT], None),
    "silu_mul_bf16": ([_POINTER] * 3 + [_INT64, _INT64, _INT64, _INT], None),
    "layer_norm_softmax_bf16": ([_POINTER] * 4 + [_INT64, _INT64, _FLOAT, _INT], None),
}


# ------------------------------------------------------------------------------------------- the composites
def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalized in fp32, cast back to x's dtype, then scaled by the weight (transformers' Qwen2/AIMv2 norms)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def reference_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def reference_layer_norm_softmax(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).softmax(dim=-1)


# ----------------------------------------------------------------------------------------------- dispatch
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fits = _one_per_column(x, weight) and _may_take(x, weight)
    library = rms_silu_library() if fits else None
    if library is None:
        return reference_rms_norm(x, weight, eps)
    return _kernel_rms_norm(library, x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate and up may be the two halves of one product's columns. Decode-sized inputs stay
    PyTorch's: below SILU_KERNEL_MIN_VALUES the call costs more than the pass saves."""
    fits = gate.dim() >= 1 and gate.shape == up.shape and gate.numel() >= SILU_KERNEL_MIN_VALUES
    library = rms_silu_library() if fits and _may_take(gate, up) else None
    stride = _row_stride(gate) if library is not None else None
    if stride is None or _row_stride(up) != stride:
        return reference_silu_mul(gate, up)
    return _kernel_silu_mul(library, gate, up, stride)


def layer_norm_softmax(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """softmax(norm(x)) over the last dimension, `norm` a LayerNorm over it."""
    weight, bias = norm.weight, norm.bias
    fits = weight is not None and bias is not None and _one_per_column(x, weight, bias)
    library = _library_for(x, weight, bias) if fits else None
    if library is None:
        return reference_layer_norm_softmax(x, weight, bias, norm.eps)
    return _kernel_layer_norm_softmax(library, x, weight, bias, norm.eps)


# ------------------------------------------------------------------------------------------------ kernels
def _kernel_rms_norm(library, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, dim = x.numel() // x.shape[-1], x.shape[-1]
    weight = weight.contiguous()
    library.rms_norm_bf16(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, dim, eps, native_build.threads_for(rows)
    )
    return out


def _kernel_silu_mul(library, gate: torch.Tensor, up: torch.Tensor, stride: int) -> torch.Tensor:
    cols = gate.shape[-1]
    rows = gate.numel() // cols
    out = torch.empty(gate.shape, dtype=gate.dtype)
    library.silu_mul_bf16(
        gate.data_ptr(), up.data_ptr(), out.data_ptr(), rows, cols, stride, native_build.threads_for(rows)
    )
    return out


def _kernel_layer_norm_softmax(library, x, weight, bias, eps: float) -> torch.Tensor:
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    out = torch.empty_like(x)
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    library.layer_norm_softmax_bf16(
        x.data_ptr(),
        weight.data_ptr(),
        bias.data_ptr(),
        out.data_ptr(),
        rows,
        cols,
        eps,
        native_build.threads_for(rows),
    )
    return out


def _library_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library where every tensor is a non-empty CPU bf16 tensor autograd does not watch, else None."""
    return kernel_library() if _may_take(*tensors) else None


def _may_take(*tensors: torch.Tensor) -> bool:
    return native_build.kernel_may_take(*tensors) and all(t.numel() for t in tensors)


def _one_per_column(x: torch.Tensor, *parameters: torch.Tensor) -> bool:
    """Each parameter holds one value per column of x (the kernels do not broadcast)."""
    return x.dim() >= 1 and all(p.shape == x.shape[-1:] for p in parameters)


def _row_stride(t: torch.Tensor) -> int | None:
    """How far apart t's rows (every index but the last) lie, when each row is contiguous and the rows evenly
    spaced (a contiguous tensor, or one half of a product's columns); None otherwise."""
    if t.stride(-1) != 1:
        return None
    if t.dim() == 1:
        return t.shape[-1]
    expected = t.stride(-2) * t.shape[-2]
    for size, stride in zip(reversed(t.shape[:-2]), reversed(t.stride()[:-2]), strict=True):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.stride(-2)


# ------------------------------------------------------------------------------------------------ loading
@cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot or should not run here (native_build.checked_library)."""
    return native_build.checked_library(
        SOURCE, SIGNATURES, agrees_with_pytorch, "OVIS2_NATIVE_POINTWISE", "pointwise bf16 kernels"
    )


def rms_silu_library() -> ctypes.CDLL | None:
    """The library RMSNorm and SiLU-and-multiply run from here: the AVX512-BF16 one, else (no AVX512-BF16) the
    AVX2 one; None where neither runs. The first call builds them."""
    library = kernel_library()
    return library if library is not None else avx2_library()


@cache
def avx2_library() -> ctypes.CDLL | None:
    """RMSNorm's and SiLU-and-multiply's kernels for CPUs with AVX2 and FMA but no AVX512-BF16
    (`kernels/pointwise_avx2.c`): the same roundings, the same switch. AMD Zen 3: one decode row of Ovis2-1B's
    RMSNorm 26 vs 39 us for the composite (the call's Python is most of it), two crops' [2, 1024, 1024] 0.72 vs
    10.3 ms; SiLU-and-multiply over a 16-prompt prefill's [784, 4864] 2.6 + 1.3 ms a layer in PyTorch."""
    return native_build.checked_library(
        AVX2_SOURCE,
        {name: SIGNATURES[name] for name in ("rms_norm_bf16", "silu_mul_bf16")},
        avx2_agrees,
        "OVIS2_NATIVE_POINTWISE",
        "the AVX2 pointwise kernels",
        cpu_has=native_build.has_avx2,
        flags=native_build.AVX2_FLAGS,
    )


def avx2_agrees(library: ctypes.CDLL) -> bool:
    """RMSNorm and SiLU-and-multiply against their composites on rows with a tail (203: not a multiple of 8 or
    16; gate and up the halves of one row), within two roundings."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 203, generator=generator) * 4).to(torch.bfloat16)
    weight = torch.randn(203, generator=generator).to(torch.bfloat16)
    gate, up = (torch.randn(3, 2, 203, generator=generator) * 4).to(torch.bfloat16).unbind(1)
    return within_bf16_roundings(
        _kernel_rms_norm(library, x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6)
    ) and within_bf16_roundings(_kernel_silu_mul(library, gate, up, 406), reference_silu_mul(gate, up))


def agrees_with_pytorch(library: ctypes.CDLL) -> bool:
    """Each kernel against its composite on rows with a tail (sizes not a multiple of 16), within the bounds below
    (RMSNorm and SiLU-and-multiply round twice)."""
    generator = torch.Generator().manual_seed(0)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)

    x, weight, bias = bf16(3, 200, scale=4.0), bf16(200), bf16(200)
    gate, up = bf16(3, 2, 200, scale=4.0).unbind(1)
    logits = F.layer_norm(x.float(), (200,), weight.float(), bias.float(), 1e-5)
    return (
        within_bf16_roundings(_kernel_rms_norm(library, x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6))
        and within_bf16_roundings(_kernel_silu_mul(library, gate, up, 400), reference_silu_mul(gate, up))
        and within_logit_rounding(
            _kernel_layer_norm_softmax(library, x, weight, bias, 1e-5),
            reference_layer_norm_softmax(x, weight, bias, 1e-5),
            logits,
        )
    )


def within_bf16_roundings(got: torch.Tensor, expected: torch.Tensor, roundings: int = 2) -> bool:
    """|got - expected| at most one bf16 spacing (2^-7 relative) of expected per rounding on the way, element by
    element: a reordered fp32 sum or an exp off in its last bits can move each rounding by one step, and the
    product of a moved value moves by the same fraction. (Not for results below 2^-126: the kernels' bf16
    conversion flushes those to zero.)"""
    got, expected = got.float(), expected.float()
    step = expected.abs().clamp_min(torch.finfo(torch.float32).tiny) * 2**-7
    return bool(((got - expected).abs() <= roundings * step).all())


def within_logit_rounding(got: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor) -> bool:
    """Two softmaxes over bf16-rounded logits, when a logit z may round one step (2^-7 |z|) apart in each: every
    log-probability within 2^-7 (|z_i| + 2 max|z|) of the other's, plus both outputs' own rounding."""
    tiny = torch.finfo(torch.float32).tiny
    size = logits.float().abs()
    slack = 2**-7 * (size + 2 * size.amax(-1, keepdim=True)) + 2**-7
    gap = got.float().clamp_min(tiny).log() - expected.float().clamp_min(tiny).log()
    return bool((gap.abs() <= slack).all())
