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

The engine lays each bf16 weight out once as 16-row panels instead (`panels_of`, through `cpu_linear`'s packing):
each panel's 16 weights of an input side by side, so a thread reads its panels as one sequential stream and
widens them in registers, without the plain layout's transposes. Zen 3, the 24 layers' products of the 1B
checkpoint's own weights: level with the plain layout at 1 row, 1.0-1.24x at 4, 1.03-1.10x at 8-16 (the
vocabulary projection 1.26x at 8), level from 64. An input's 16 weights are stored interleaved (`LANE_ROWS`) so
they widen with one shift and one mask: a batch-16 decode step 1.04-1.07x faster than two 8-weight widenings.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from . import native_build

SOURCE = native_build.KERNELS / "bf16_rows_avx2.c"
_PRODUCT = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], ctypes.c_int)
SIGNATURES = {"bf16_rows_product": _PRODUCT, "bf16_panels_product": _PRODUCT}
PANEL = 16  # weight rows of a panel
LANE_ROWS = tuple(
    row for lane in range(PANEL // 2) for row in (lane, lane + PANEL // 2)
)  # row at each position


@dataclass(frozen=True, eq=False)
class PanelWeight:
    """A bf16 weight [out_features, in_features] laid out for `panels_computed`: ceil(out_features / 16) panels of
    16 weight rows, each stored input by input (`data` [panels, in_features, 16]; rows past out_features zero).
    An input's 16 weights are interleaved, rows 0 8 1 9 ... 7 15 of the panel (`LANE_ROWS`): each 32-bit lane
    holds row j in its low half and row 8 + j in its high half, so the kernel widens 16 weights with one shift
    and one mask."""

    data: torch.Tensor
    out_features: int

    @property
    def in_features(self) -> int:
        return self.data.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def dense(self) -> torch.Tensor:
        """The plain weight [out_features, in_features], a fresh tensor."""
        lanes = self.data.view(-1, self.in_features, PANEL // 2, 2)  # [panels, in, lane, half]
        rows = lanes.permute(0, 3, 2, 1).reshape(-1, self.in_features)  # row 8 half + lane of each panel
        return rows[: self.out_features].clone()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids` (indices of any shape) -> [*ids.shape, in_features], as F.embedding reads them
        from the plain weight."""
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise IndexError(f"row index out of range: the weight has {self.out_features} rows")
        lanes = self.data.view(-1, self.in_features, PANEL // 2, 2)  # [panels, in, lane, half]
        place = flat % PANEL
        picked = lanes[flat // PANEL, :, place % (PANEL // 2), place // (PANEL // 2)]  # [ids, in]
        return picked.view(*ids.shape, self.in_features)


def panels_of(weight: torch.Tensor) -> PanelWeight:
    """A 2-d weight's panels (a copy; the weight is left as it is)."""
    out_features, in_features = weight.shape
    padded = F.pad(weight, (0, 0, 0, -out_features % PANEL)) if out_features % PANEL else weight
    halves = padded.reshape(-1, 2, PANEL // 2, in_features)  # [panels, half, lane, in]: row 8 half + lane
    lanes = torch.empty(len(halves), in_features, PANEL // 2, 2, dtype=weight.dtype, device=weight.device)
    for half in range(2):  # a half at a time: ~2x faster than one copy of the permuted view
        lanes[..., half].copy_(halves[:, half].transpose(1, 2))
    return PanelWeight(lanes.view(-1, in_features, PANEL), out_features)


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
    if not takes(x, weight, bias):
        return None
    return _compute(kernel_library().bf16_rows_product, x, weight, bias, *weight.shape)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, [rows, in] -> [rows, out] bf16, for what `takes` accepts (ValueError otherwise)."""
    return _run(kernel_library(), x, weight, bias)


def panels_computed(x: torch.Tensor, panels: PanelWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias for the weight laid out in `panels`, [rows, in] -> [rows, out] bf16, where the kernel
    takes them (as `takes` says for the plain weight); None elsewhere."""
    if _panels_refusal(x, panels, bias) is not None or native_build.autograd_sees(x, panels.data, bias):
        return None
    library = kernel_library()
    return (
        None
        if library is None
        else _compute(library.bf16_panels_product, x, panels.data, bias, *_sizes(panels))
    )


def panels_product(x: torch.Tensor, panels: PanelWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """`panels_computed` for what the kernel takes (ValueError otherwise)."""
    refusal = _panels_refusal(x, panels, bias)
    if refusal is not None:
        raise ValueError(refusal)
    return _compute(kernel_library().bf16_panels_product, x, panels.data, bias, *_sizes(panels))


def _sizes(panels: PanelWeight) -> tuple[int, int]:
    return panels.out_features, panels.in_features


def _panels_refusal(x: torch.Tensor, panels: PanelWeight, bias: torch.Tensor | None) -> str | None:
    data, out_features = panels.data, panels.out_features
    laid_out = data.dim() == 3 and data.shape[2] == PANEL and data.is_contiguous()
    if not laid_out or not 0 < out_features <= PANEL * data.shape[0] < out_features + PANEL:
        return f"panels of shape {tuple(data.shape)} for {out_features} outputs"
    return _refusal(x, data.view(-1, data.shape[1]), bias, out_features)


def _refusal(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int | None = None
) -> str | None:
    """Why the kernel, which reads raw pointers, cannot be handed these; None when it can."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors):
        return "the few-row bf16 kernel takes CPU bf16 tensors"
    if weight.dim() != 2 or not weight.is_contiguous() or weight.numel() == 0:
        return "the few-row bf16 kernel takes a contiguous non-empty 2-d weight"
    if x.shape[:-1].numel() < 1 or x.shape[-1] != weight.shape[1]:
        return f"the few-row bf16 kernel takes rows of {weight.shape[1]}, not {tuple(x.shape)}"
    out_features = weight.shape[0] if out_features is None else out_features
    if bias is not None and tuple(bias.shape) != (out_features,):
        return f"bias of shape {tuple(bias.shape)} for {out_features} outputs"
    return None


def _run(library: ctypes.CDLL, x, weight, bias) -> torch.Tensor:
    refusal = _refusal(x, weight, bias)
    if refusal is not None:
        raise ValueError(refusal)
    return _compute(library.bf16_rows_product, x, weight, bias, *weight.shape)


def _compute(function, x, weight, bias, out_features: int, in_features: int) -> torch.Tensor:
    """A kernel's call (`function`: the plain or the panels product), for inputs its refusal passed."""
    rows = x.shape[:-1].numel()
    x = x.reshape(rows, in_features).contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(rows, out_features, dtype=torch.bfloat16, device="cpu")
    status = function(
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
    """Both layouts: rows streamed (1, 2, 3, 5, 8) and met 6 at a time (9, 13, and 130: two blocks of rows), with
    and without a bias, over a weight with both edges (n % 16, k % 8, an odd k) and more than one block of inputs
    (k > 256)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(130, 1101, generator=generator).to(torch.bfloat16)
    bias = torch.randn(130, generator=generator).to(torch.bfloat16)
    panels = panels_of(weight)
    for rows in (1, 2, 3, 5, 8, 9, 13, 130):
        x = torch.randn(rows, 1101, generator=generator).to(torch.bfloat16)
        for b in (None, bias):
            plain = _run(library, x, weight, b)
            laid_out = _compute(library.bf16_panels_product, x, panels.data, b, 130, 1101)
            if not (
                within_product_bound(plain, x, weight, b) and within_product_bound(laid_out, x, weight, b)
            ):
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
