"""Decode attention (one new token per sequence) over the paged KV cache, read in place by a compiled kernel.

PyTorch's way on CPU gathers each sequence's keys and values out of their blocks, then runs SDPA with a key mask:
~14 ops and ~0.1 ms a layer at batch 1 on a 2-core Xeon, a few milliseconds of every decode step.
`kernels/decode_attention.c` walks the block table itself and computes the attention in one call, in fp32 with
one bf16 rounding of the output (PyTorch's bf16 SDPA also rounds the attention weights: the kernel's outputs are
the closer to exact). Built like the other kernels (native_build.py), for AVX512-BF16 where the CPU has it and
for AVX2 elsewhere (AMD Zen 3, Ovis2-1B's heads over 256 keys: 28 us a layer against ~100 for the gather + SDPA);
used for bf16 caches unless `OVIS2_NATIVE_ATTENTION=0`, and `None` (the caller's SDPA) everywhere else.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from . import native_build

SOURCE = native_build.KERNELS / "decode_attention.c"
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {
    "paged_decode_attention_bf16": (
        [_POINTER] * 6 + [_INT64] * 7 + [ctypes.c_float, ctypes.c_int],
        ctypes.c_int,
    )
}
MAX_GROUP, MAX_HEAD_DIM = 16, 256  # the kernel's fixed limits


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> torch.Tensor | None:
    """q: [B, h, d]; caches: [blocks, block_size, kvh, d]; block_tables: [B, max_blocks] int64; seq_lens: [B]
    int64 (the query is the last of them). Returns [B, h, d], or None where the kernel does not apply (the
    caller's SDPA then computes it, or raises for tables that point outside the cache)."""
    if not _applies(q, k_cache, v_cache, block_tables, seq_lens):
        return None
    library = kernel_library()
    if library is None:
        return None
    return _run(library, q, k_cache, v_cache, block_tables, seq_lens)


def _applies(q, k_cache, v_cache, block_tables, seq_lens) -> bool:
    return (
        native_build.kernel_may_take(q, k_cache, v_cache)
        and block_tables.device.type == "cpu"
        and seq_lens.device.type == "cpu"
        and layout_fits(q, k_cache, v_cache, block_tables, seq_lens)
        and q.shape[2] % 16 == 0
    )


def layout_fits(q, k_cache, v_cache, block_tables, seq_lens) -> bool:
    """The layout a decode attention kernel takes (this one, and the CUDA one): q [B, h, d], contiguous caches
    [blocks, block_size, kvh, d] alike, int64 block tables [B, max_blocks] and lengths [B], at most MAX_GROUP query
    heads a KV head, d at most MAX_HEAD_DIM."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or q.dim() != 3 or k_cache.dim() != 4:
        return False
    tables_fit = block_tables.dim() == 2 and block_tables.shape[0] == q.shape[0] == seq_lens.numel()
    if not tables_fit or block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        return False
    heads, dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    return (
        heads % kv_heads == 0
        and heads // kv_heads <= MAX_GROUP
        and dim <= MAX_HEAD_DIM
        and k_cache.shape[3] == dim
        and v_cache.shape == k_cache.shape
    )


def _run(library, q, k_cache, v_cache, block_tables, seq_lens) -> torch.Tensor | None:
    seqs, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    q, tables, lens = q.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    refused = library.paged_decode_attention_bf16(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        seqs,
        heads,
        kv_heads,
        dim,
        block_size,
        tables.shape[1],
        k_cache.shape[0],
        dim**-0.5,
        native_build.threads_for(seqs * kv_heads),
    )
    return None if refused else out


@cache
def kernel_library() -> ctypes.CDLL | None:
    """The kernel built for AVX512-BF16 where the CPU has it, else (or where that build fails or disagrees) for AVX2
    and FMA; None where neither builds or runs here (native_build.checked_library)."""
    for cpu_has, flags in (
        (native_build.has_avx512_bf16, native_build.BF16_FLAGS),
        (native_build.has_avx2, native_build.AVX2_FLAGS),
    ):
        library = native_build.checked_library(
            SOURCE,
            SIGNATURES,
            agrees_with_reference,
            "OVIS2_NATIVE_ATTENTION",
            "the decode attention kernel",
            cpu_has=cpu_has,
            flags=flags,
        )
        if library is not None:
            return library
    return None


def reference(q, k_cache, v_cache, block_tables, seq_lens) -> torch.Tensor:
    """SDPA over each sequence's gathered keys and values, one sequence at a time: [B, h, d]."""
    outputs = []
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    for row, length in enumerate(seq_lens.tolist()):
        blocks = block_tables[row, : (length + block_size - 1) // block_size]
        keys = k_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)  # [kvh, S, d]
        values = v_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)
        query = q[row].view(kv_heads, -1, q.shape[-1])  # [kvh, group, d]
        outputs.append(F.scaled_dot_product_attention(query, keys, values).reshape(q.shape[1:]))
    return torch.stack(outputs)


def agrees_with_reference(library: ctypes.CDLL) -> bool:
    """Two sequences of 5 and 37 keys over shuffled blocks of 16, on three head layouts: 6 query heads on 2 KV heads
    of 32 (the loops' run-time path) and the ones compiled apart, Ovis2-1B's 14 on 2 of 64 and the larger sizes' 12
    on 2 of 128. The kernel's output within one bf16 step (2^-7 of the largest value) of the attention computed in
    float64."""
    generator = torch.Generator().manual_seed(0)
    tables = torch.tensor([[4, 0, 0], [2, 5, 1]])
    lens = torch.tensor([5, 37])
    for heads, kv_heads, dim in ((6, 2, 32), (14, 2, 64), (12, 2, 128)):
        k_cache, v_cache = (
            torch.randn(6, 16, kv_heads, dim, generator=generator).to(torch.bfloat16) for _ in range(2)
        )
        q = torch.randn(2, heads, dim, generator=generator).to(torch.bfloat16)
        got = _run(library, q, k_cache, v_cache, tables, lens)
        expected = reference(q.double(), k_cache.double(), v_cache.double(), tables, lens)
        if got is None or not (got.double() - expected).abs().max() <= 2**-7 * expected.abs().max():
            return False
    return True
