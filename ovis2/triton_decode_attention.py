"""Decode attention (one new token per sequence) over the paged KV cache on CUDA, read in place by a Triton kernel.

PyTorch's way (layers._decode_attention) gathers every sequence's keys and values out of their blocks into a
padded copy, per layer per step (inside a CUDA graph: up to the context bucket), then runs SDPA: on a GPU that copy
costs about as many bytes as the attention reads. Here each program takes one sequence, one KV head and a run of
its blocks (a split, so a few long sequences still fill the GPU), walks the block table itself and keeps an online
softmax in fp32 for the query heads of that KV head; the splits' partial sums are then combined. No host waits, so
the decode graphs capture it.

Used for CUDA tensors where Triton imports and a check against SDPA on the device passes once (`ready`), unless
`OVIS2_TRITON_ATTENTION=0`; `computed` returns None everywhere else (the caller's SDPA). Triton builds its launcher
with the host's C compiler and Python headers: the Docker image has neither, so SDPA serves there. On a CPU the
same kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from functools import cache

import torch

from . import decode_attention

logger = logging.getLogger(__name__)
TARGET_PROGRAMS = 512  # programs a step aims at: a few per streaming multiprocessor
MIN_BLOCKS_PER_SPLIT = 4


def computed(q, k_cache, v_cache, block_tables, seq_lens) -> torch.Tensor | None:
    """[B, h, d] attention of each sequence's last position, or None where this kernel does not serve (not CUDA,
    no Triton, switched off, a layout it does not take, or its check on this device failed)."""
    if q.device.type != "cuda" or not takes(q, k_cache, v_cache, block_tables, seq_lens):
        return None
    if not prepare(q.device, k_cache.dtype):
        return None
    return launched(q, k_cache, v_cache, block_tables, seq_lens)


_FAILED_LAYOUTS: set[tuple] = set()  # (device, dtype, heads, cache shape but blocks) the kernel failed to run


def launched(q, k_cache, v_cache, block_tables, seq_lens) -> torch.Tensor | None:
    """The kernel's output, or None (SDPA from then on for this layout) where it fails to build or launch for a
    layout `ready` did not check."""
    layout = (q.device, k_cache.dtype, q.shape[1], *k_cache.shape[1:])
    if layout in _FAILED_LAYOUTS:
        return None
    try:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens)
    except Exception as error:  # noqa: BLE001 - e.g. a head size whose program needs more registers than exist
        _FAILED_LAYOUTS.add(layout)
        logger.warning(
            "the Triton decode attention kernel failed for %s (%s: %s); SDPA computes it",
            layout,
            type(error).__name__,
            error,
        )
        return None


def prepare(device: torch.device, dtype: torch.dtype) -> bool:
    """At start-up: whether the kernel will serve decode attention on this device (its check run now), unless it is
    switched off."""
    return os.environ.get("OVIS2_TRITON_ATTENTION", "1") != "0" and ready(device, dtype)


def takes(q, k_cache, v_cache, block_tables, seq_lens) -> bool:
    block_size = k_cache.shape[1] if k_cache.dim() == 4 else 0
    return (
        all(t.device == q.device for t in (k_cache, v_cache, block_tables, seq_lens))
        and decode_attention.layout_fits(q, k_cache, v_cache, block_tables, seq_lens)
        and block_size & (block_size - 1) == 0
    )


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens) -> torch.Tensor:
    """q: [B, h, d]; caches: [blocks, block_size, kvh, d]; block_tables: [B, max_blocks] int64; seq_lens: [B]
    int64 (each >= 1; the query is the last position). Returns [B, h, d] in q's dtype. Unchecked: see `computed`."""
    import triton

    seqs, heads, dim = q.shape
    kv_heads, width = k_cache.shape[2], block_tables.shape[1]
    per_split = max(MIN_BLOCKS_PER_SPLIT, triton.cdiv(seqs * kv_heads * width, TARGET_PROGRAMS))
    splits = triton.cdiv(width, per_split)
    best = torch.empty(seqs, heads, splits, dtype=torch.float32, device=q.device)
    total = torch.empty_like(best)
    acc = torch.empty(seqs, heads, splits, dim, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():  # Triton launches on the current device
        _launch(q, k_cache, v_cache, block_tables, seq_lens, best, total, acc, per_split, splits)
    weights = torch.exp(best - best.amax(dim=-1, keepdim=True))  # a split past a sequence's end weighs 0
    out = (acc * weights[..., None]).sum(dim=2) / (total * weights).sum(dim=-1, keepdim=True)
    return out.to(q.dtype)


def _launch(
    q, k_cache, v_cache, block_tables, seq_lens, best, total, acc, per_split: int, splits: int
) -> None:
    import triton

    seqs, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    _kernel(_interpreted())[(seqs, kv_heads, splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        block_tables.contiguous(),
        seq_lens.contiguous(),
        best,
        total,
        acc,
        block_tables.shape[1],
        per_split,
        dim**-0.5,
        GROUP=group,
        GROUP_PAD=max(2, triton.next_power_of_2(group)),
        DIM=dim,
        DIM_PAD=triton.next_power_of_2(dim),
        BLOCK_SIZE=block_size,
        KV_HEADS=kv_heads,
    )


@cache
def ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel builds on this device and agrees with SDPA there (within one bf16 step of the largest
    output), on GQA groups of 6 and 7 and head sizes 64 and 128 over shuffled blocks; checked once per device."""
    try:
        agrees = _agrees_with_reference(device, dtype)
    except Exception as error:  # noqa: BLE001 - no Triton, no C compiler for its launcher, an old driver: SDPA
        logger.warning(
            "the Triton decode attention kernel does not run here (%s: %s); SDPA computes decode attention",
            type(error).__name__,
            error,
        )
        return False
    if not agrees:
        logger.error(
            "the Triton decode attention kernel disagrees with SDPA here; SDPA computes decode attention"
        )
    return agrees


def _agrees_with_reference(device: torch.device, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    tables = torch.tensor([[4, 0, 0, 0], [2, 5, 1, 3], [6, 0, 0, 0]])
    lens = torch.tensor([5, 53, 16])
    for heads, kv_heads, dim in ((12, 2, 128), (14, 2, 64)):
        caches = [torch.randn(7, 16, kv_heads, dim, generator=generator).to(dtype) for _ in range(2)]
        q = torch.randn(3, heads, dim, generator=generator).to(dtype)
        expected = decode_attention.reference(q.double(), *(c.double() for c in caches), tables, lens)
        on_device = [t.to(device) for t in (q, *caches, tables, lens)]
        got = paged_decode_attention(*on_device).double().cpu()
        if not (got - expected).abs().max() <= 2**-7 * expected.abs().max():
            return False
    return True


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _kernel(interpreted: bool):  # noqa: ARG001 - a kernel jitted under the interpreter is cached apart
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_partials(
        q,
        k_cache,
        v_cache,
        tables,
        lens,
        best_out,
        total_out,
        acc_out,
        table_width,
        per_split,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        KV_HEADS: tl.constexpr,
    ):
        seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        splits = tl.num_programs(2)
        length = tl.load(lens + seq)
        group, dims, slots = tl.arange(0, GROUP_PAD), tl.arange(0, DIM_PAD), tl.arange(0, BLOCK_SIZE)
        head = kv_head * GROUP + group
        in_group, in_dims = group < GROUP, dims < DIM
        query_mask = in_group[:, None] & in_dims[None, :]
        query_at = (seq * (KV_HEADS * GROUP) + head)[:, None] * DIM + dims[None, :]
        query = tl.load(q + query_at, mask=query_mask, other=0.0).to(tl.float32) * scale
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        first = split * per_split
        last = tl.minimum(first + per_split, tl.cdiv(length, BLOCK_SIZE))
        for index in range(first, last):
            block = tl.load(tables + seq * table_width + index)
            valid = index * BLOCK_SIZE + slots < length
            at = ((block * BLOCK_SIZE + slots) * KV_HEADS + kv_head)[:, None] * DIM + dims[None, :]
            kv_mask = valid[:, None] & in_dims[None, :]
            keys = tl.load(k_cache + at, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, DIM_PAD]
            scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            values = tl.load(v_cache + at, mask=kv_mask, other=0.0).to(tl.float32)
            total = total * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
            best = new_best
        out_at = (seq * (KV_HEADS * GROUP) + head) * splits + split
        tl.store(best_out + out_at, best, mask=in_group)
        tl.store(total_out + out_at, total, mask=in_group)
        tl.store(acc_out + out_at[:, None] * DIM + dims[None, :], acc, mask=query_mask)

    return paged_decode_partials
