"""Linear layers on CPU, each product computed the way torch runs it fastest for its number of rows.

`F.linear` on CPU is MKL's sgemm. Measured with torch 2.13 on AMD EPYC (Zen 3, AVX2, 2 cores), on the Ovis2-1B
shapes, the same fp32 product runs 1.3-3.5x faster for 2-7 rows computed as `weight @ x.T`, and oneDNN's inner
product is faster than both for one row (a decode step's GEMV streams at 1.3-2x MKL's bandwidth) and from 8 rows
on (1.2-2.8x: decode batches, prefill, the vision tower). A CPU without bf16 instructions (AVX2 only) runs a bf16
product of more than one row at ~16 GFLOP/s; there every bf16 product takes `bf16_rows`' compiled kernel (the
bf16 weight widened as it is read, fp32 sums), and without the kernel 2 and more rows widen the weight to fp32 a
block of rows at a time for the fp32 path (accumulating in fp32, as a native bf16 kernel does); one row without
the kernel stays torch's bf16 GEMV, which streams the bf16 weight well. `python -m
bench.bench_cpu_linear` prints the ratios on the machine at hand. CUDA tensors, and any dtype but fp32/bf16, take
`F.linear`.

The engine packs each bf16 weight once into the layout this CPU's kernels read fastest (`pack_linears`,
`Linear.pack`): where oneDNN computes bf16 itself (AMX, AVX512-BF16), oneDNN's blocked layout (measured on a 2-core
Xeon with AMX, a decode step 1.38x faster; one-row products through `packed_gemv`'s compiled kernel where it runs);
where `bf16_rows`' kernel serves, its 16-row panels (`bf16_rows.PanelWeight`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_rows
from .bf16_rows import PanelWeight
from .native_build import autograd_sees
from .packed_gemv import OneRowProduct, one_row_product

TRANSPOSED_MAX_ROWS = 7  # fp32, 2..7 rows: weight @ x.T; 1 or >= 8: oneDNN (Intel: F.linear below 8)
SMALL_WEIGHT_BYTES = 1 << 20  # a weight this small (Qwen2's k/v): F.linear, oneDNN's call costs more
TRANSPOSED_BLOCK_ROWS = 8192  # weight rows per block of the transposed product
WIDEN_BLOCK_BYTES = 2 << 20  # fp32 bytes of one widened weight block for few rows: stays in L2/L3
# For many rows (prefill, the vision tower) each block's product is long enough that bigger blocks win: Zen 3,
# 1024 rows, gate/up 199 -> 151-157 ms (fp32 weights: 149), fc2 49 -> 48 (40); 64 rows down 8.5 -> 6.0 (5.2).
MANY_ROWS = 64
MANY_ROWS_WIDEN_BLOCK_BYTES = 32 << 20
# oneDNN picks a packed layout for the rows it is told to expect: decode steps run 1-16. With AMX, 16 gives a
# 32-column block (AB16b32a2b) that also reads faster at one row than hint 1's 64-column one (Xeon model 207:
# 7.5 -> 10.2 GB/s for gate/up, batch-1 step best 143 -> 116 ms); without AMX every hint gives the same layout.
DECODE_ROWS_HINT = 16


_weights_generation = 0  # see weights_generation


def weights_generation() -> int:
    """A count that moves whenever any `Linear` packs, unpacks, fuses or takes new weights (a state dict, `.to()`):
    what a cache of weight addresses (native_decode's) keys on."""
    return _weights_generation


def weights_changed() -> None:
    global _weights_generation
    _weights_generation += 1


@cache
def mkl_handles_few_rows() -> bool:
    """Intel CPUs: there MKL's own kernels behind F.linear are the fastest for 1-7 fp32 rows (measured on a Xeon
    with AMX: one row at ~26 GB/s, oneDNN 0.63-0.98x of it, the transposed product 0.48-0.98x); on AMD they are
    the slowest (the rule above)."""
    return _cpu_vendor() == "GenuineIntel"


def _cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


@cache
def onednn_fp32_available() -> bool:
    return _onednn_works(torch.float32)


@cache
def native_bf16_matmul() -> bool:
    """True when oneDNN computes bf16 itself (AVX512-BF16, AMX, ...); False on AVX2-only CPUs."""
    return _onednn_works(torch.bfloat16)


def _onednn_works(dtype: torch.dtype, packed: bool = False) -> bool:
    try:
        x, w = torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype)
        if packed:
            w = torch.ops.mkldnn._reorder_linear_weight(w, DECODE_ROWS_HINT)
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):  # absent, unsupported, or another signature
        return False
    return bool(torch.equal(out.float(), torch.full((2, 4), 8.0)))


def emulates_bf16(t: torch.Tensor) -> bool:
    """A CPU bf16 tensor on a CPU without bf16 units: there torch's own bf16 matmul and convolution run at ~1
    GFLOP/s (AMD Zen 3: a 448x448 crop's visual-table product took 36 s, in fp32 0.2 s). (Its bf16 SDPA is not
    affected: 0.8 s of that crop, as in fp32.)"""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16 and not native_bf16_matmul()


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a: [..., K], b: [K, N]. Where bf16 is emulated, computed in fp32 over cache-sized blocks of K and
    rounded to bf16 once, as a native bf16 product accumulates."""
    plain = emulates_bf16(b) and a.dtype == b.dtype and b.dim() == 2 and a.shape[-1] == b.shape[0]
    if not plain or autograd_sees(a, b):
        return a @ b  # (a shape mismatch raises there)
    flat = a.reshape(-1, a.shape[-1])
    out = torch.zeros(flat.shape[0], b.shape[1], dtype=torch.float32, device="cpu")
    block = max(1, widen_block_bytes(flat.shape[0]) // (4 * b.shape[1]))
    for start in range(0, b.shape[0], block):
        out.addmm_(flat[:, start : start + block].float(), b[start : start + block].float())
    return out.to(b.dtype).view(*a.shape[:-1], b.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), any leading dimensions."""
    rows = x.shape[:-1].numel()
    if rows == 0 or not _dispatchable(x, weight, bias):
        return F.linear(x, weight, bias)
    flat_x = x.reshape(rows, x.shape[-1])
    if x.dtype == torch.float32:
        flat = _fp32_rows(flat_x, weight, bias)
    elif native_bf16_matmul():
        return F.linear(x, weight, bias)
    elif (flat := bf16_rows.computed(flat_x, weight, bias)) is None:
        if rows == 1:  # one bf16 row streams half the bytes of a widened one
            return F.linear(x, weight, bias)
        flat = _widened(flat_x, weight, bias)
    return flat.view(*x.shape[:-1], weight.shape[0])


def _dispatchable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU, fp32 or bf16, a contiguous weight, and nothing to differentiate (oneDNN's op has no gradient)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    return not autograd_sees(x, weight, bias) and weight.is_contiguous()


def _fp32_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.numel() * 4 < SMALL_WEIGHT_BYTES:
        return F.linear(x, weight, bias)
    if x.shape[0] <= TRANSPOSED_MAX_ROWS and mkl_handles_few_rows():
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


def widen_block_bytes(rows: int) -> int:
    return MANY_ROWS_WIDEN_BLOCK_BYTES if rows >= MANY_ROWS else WIDEN_BLOCK_BYTES


def _widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 in and out, fp32 inside: one block of weight rows widened at a time."""
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    block = max(1, widen_block_bytes(x.shape[0]) // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], block):
        stop = min(start + block, weight.shape[0])
        part_bias = bias[start:stop].float() if bias is not None else None
        out[:, start:stop] = _fp32_rows(x32, weight[start:stop].float(), part_bias)
    return out


def bf16_rows_serve() -> bool:
    """Whether bf16 decode rows are `bf16_rows`' kernel's here: oneDNN emulates bf16 on this CPU and the kernel
    built (the first call builds it)."""
    return not native_bf16_matmul() and bf16_rows.kernel_library() is not None


def lays_out_panels(dtype: torch.dtype) -> bool:
    """Whether weights of this dtype are packed as `bf16_rows`' panels here: bf16 where that kernel serves."""
    return dtype == torch.bfloat16 and bf16_rows_serve()


def packs_weights(dtype: torch.dtype) -> bool:
    """Whether `pack_linears` packs weights of this dtype here: bf16 where oneDNN computes bf16 itself, or where
    `bf16_rows` serves (its panels).

    With bf16 units F.linear hands oneDNN a plain weight that it reorders into its blocked (AMX/VNNI) layout on
    every call; a weight reordered once runs 1.2-2.2x faster at 1-64 rows (`python -m bench.bench_cpu_linear
    --dtype bfloat16 --packed`). fp32 keeps `linear`'s dispatch (packing was 0.8-1.0x at one row)."""
    if lays_out_panels(dtype):
        return True
    return dtype == torch.bfloat16 and native_bf16_matmul() and onednn_packing_available(dtype)


Packed = torch.Tensor | PanelWeight  # a weight oneDNN reordered, or bf16_rows' panels


def can_pack(dtype: torch.dtype) -> bool:
    """Whether `packed_form` packs weights of this dtype here (whether that helps is `packs_weights`')."""
    return lays_out_panels(dtype) or onednn_packing_available(dtype)


def packed_form(weight: torch.Tensor, rows_hint: int | None) -> tuple[Packed, OneRowProduct | None] | None:
    """A plain CPU weight packed once (a copy) for this CPU, and the one-row product over it where there is one:
    `bf16_rows`' panels for bf16 where that kernel serves, else oneDNN's layout where oneDNN packs the dtype;
    None where neither does."""
    if lays_out_panels(weight.dtype):
        return bf16_rows.panels_of(weight), None
    if not onednn_packing_available(weight.dtype):
        return None
    packed = reordered_weight(weight, rows_hint)
    return packed, one_row_for(packed, weight, rows_hint)


def dense_of(packed: Packed) -> torch.Tensor:
    """The plain weight back from a packed one (a fresh tensor)."""
    return packed.dense() if isinstance(packed, PanelWeight) else packed.to_dense()


@cache
def onednn_packing_available(dtype: torch.dtype) -> bool:
    return _onednn_works(dtype, packed=True)


def pack_linears(model: nn.Module, dtypes=None, rows_hint: int | None = DECODE_ROWS_HINT) -> int:
    """Pack every CPU `Linear` weight of `model` once (`packed_form`); returns how many.

    `dtypes`: the weight dtypes to pack (default: those `packs_weights` says help here). `rows_hint`: the rows
    oneDNN should expect (None: its own default, best for the vision tower's 1024-row products). A weight no
    other module of `model` shares is freed (the packed copy replaces it); a shared one (the tied vocabulary
    projection, also the embedding table) is kept beside it."""
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    packed = 0
    for module in model.modules():
        if not isinstance(module, Linear) or module.packed_weight is not None:
            continue
        dtype = module.weight.dtype
        wanted = dtype in dtypes if dtypes is not None else packs_weights(dtype)
        if wanted and module.pack(keep_dense=uses[id(module.weight)] > 1, rows_hint=rows_hint):
            packed += 1
    return packed


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose CPU forward takes `linear`'s dispatch, or a weight
    packed once (`pack`). A packed module's state dict still holds the plain weight."""

    packed_weight: Packed | None = None
    one_row: OneRowProduct | None = None  # the compiled one-row product over packed_weight, where it runs
    fused_into = None  # the fused_linear.FusedLinears holding this weight's rows (its own weight then freed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return self._packed_forward(x)
        if self.fused_into is not None:  # the owner calls the group; alone, the plain product
            return F.linear(x, self.fused_into.rows_of(self), self.bias)
        return linear(x, self.weight, self.bias)

    def __setattr__(self, name: str, value) -> None:
        # A new weight: the packed copy of the old one must not outlive it. A new bias: a fused group holds a copy
        # of the members' biases (a packed module reads its own bias each call).
        packed = self.packed_weight is not None and name == "weight"
        if packed or (self.fused_into is not None and name in ("weight", "bias")):
            self.unpack()
        super().__setattr__(name, value)

    def pack(self, keep_dense: bool = False, rows_hint: int | None = DECODE_ROWS_HINT) -> bool:
        """Pack the weight (`packed_form`: CPU, contiguous, a dtype packed here); False when it cannot."""
        weight = self.weight
        if weight.device.type != "cpu" or not weight.is_contiguous() or weight.numel() == 0:
            return False
        with torch.no_grad():
            form = packed_form(weight.detach(), rows_hint)
            if form is None:
                return False
            weights_changed()
            self.packed_weight, self.one_row = form
            if not keep_dense:
                self.weight.data = weight.new_empty(0)
        return True

    def unpack(self) -> None:
        """The plain weight back (freed by `pack` or `fused_linear.fuse`), the packed one dropped."""
        weights_changed()
        if self.fused_into is not None:
            self.fused_into.release()  # every member of the group takes its weight back
        if self.packed_weight is None:
            return
        if self.weight.numel() == 0:
            self.weight.data = dense_of(self.packed_weight)
        self.packed_weight = self.one_row = None

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_weight
        if (
            x.device.type != "cpu"
            or x.dtype != packed.dtype
            or x.shape[:-1].numel() == 0
            or autograd_sees(x, self.weight, self.bias)
        ):
            return F.linear(x, self.weight if self.weight.numel() else dense_of(packed), self.bias)
        return packed_product(x, packed, self.bias, self.out_features, self.one_row)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed_weight is not None and self.weight.numel() == 0:
            destination[prefix + "weight"] = dense_of(self.packed_weight)
        elif self.fused_into is not None:
            destination[prefix + "weight"] = self.fused_into.rows_of(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.unpack()  # .to(device/dtype) and friends convert the plain weight; the packed one would be stale
        return super()._apply(fn, recurse)


def packed_product(
    x: torch.Tensor,
    packed: Packed,
    bias: torch.Tensor | None,
    out_features: int,
    one_row: OneRowProduct | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias with a weight packed by `packed_form`, any leading dimensions; one row through
    `one_row` where given (`packed_gemv.one_row_product`)."""
    if one_row is not None and one_row.accepts(x, bias):
        return one_row(x, bias).view(*x.shape[:-1], out_features)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if isinstance(packed, PanelWeight):
        out = bf16_rows.panels_computed(flat, packed, bias)
        if out is None:  # a row of another width or dtype: F.linear says why
            out = F.linear(flat, packed.dense(), bias)
        return out.view(*x.shape[:-1], out_features)
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out_features)


def one_row_for(packed: torch.Tensor, weight: torch.Tensor, rows_hint: int | None) -> OneRowProduct | None:
    """The one-row product over a weight packed for decode; None for one packed for many rows (rows_hint None:
    the vision tower's 1024, never one) or where the kernel cannot read it."""
    return one_row_product(packed, weight) if rows_hint is not None else None


def reordered_weight(weight: torch.Tensor, rows_hint: int | None) -> torch.Tensor:
    if rows_hint is None:
        return torch.ops.mkldnn._reorder_linear_weight(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
