"""Layer helpers against plain references: the engine's paged attention (both paths)."""

from __future__ import annotations

import pytest
import torch

from ovis2.layers import PagedAttentionMetadata, paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def reference(q, k, v):
    """q: [T, h, d]; k, v: [T, kvh, d] of one sequence from position 0; explicit softmax, causal."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / HEAD_DIM**0.5
    future = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", weights, v)


def run(q, k, v, lengths, starts_at_zero):
    blocks_per_seq = [(n + BLOCK - 1) // BLOCK for n in lengths]
    k_cache = torch.zeros(sum(blocks_per_seq) + 1, BLOCK, KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    tables, slots, next_block = [], [], 1  # block 0 stays unused, as the engine's padding entry
    for n, count in zip(lengths, blocks_per_seq, strict=True):
        table = list(range(next_block, next_block + count))
        next_block += count
        tables.append(table + [0] * (max(blocks_per_seq) - count))
        slots.extend(table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    meta = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts),
        seq_lens=torch.tensor(lengths),
        block_tables=torch.tensor(tables),
        max_query_len=max(lengths),
        max_seq_len=max(lengths),
        kv_caches=[(k_cache, v_cache)],
        starts_at_zero=starts_at_zero,
    )
    return paged_attention(q, k, v, meta, layer=0), k_cache


@pytest.mark.parametrize("starts_at_zero", [True, False])
def test_prefill_of_uneven_sequences_matches_reference(starts_at_zero):
    lengths = [5, 9, 1]
    generator = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator)
    out, k_cache = run(q, k, v, lengths, starts_at_zero)
    assert out.shape == q.shape
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        # a convex combination of v's rows, summed in another order: a few float32 ulps of v's scale
        allowed = 16 * torch.finfo(torch.float32).eps * v[part].abs().max().item()
        assert (out[part] - reference(q[part], k[part], v[part])).abs().max().item() <= allowed
        start += n
    assert torch.equal(
        k_cache.flatten(0, 1)[BLOCK : BLOCK + lengths[0]], k[: lengths[0]]
    )  # written to the pool
