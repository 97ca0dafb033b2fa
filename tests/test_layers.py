"""Layer helpers against plain references: the engine's paged attention (both paths), RMSNorm."""

from __future__ import annotations

import pytest
import torch

from ovis2.layers import PagedAttentionMetadata, RMSNorm, paged_attention

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_reference_recipe(dtype):
    """transformers' Qwen2RMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, times the weight. A
    reordered fp32 mean may move the fp32 value by a few ulps, so a bf16 result by at most one rounding."""
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 896) * 4).to(dtype)
    norm = RMSNorm(896, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(896) + 0.5)
    norm = norm.to(dtype)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == expected.dtype
    tolerance = (8 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps) * 2
    assert ((got.float() - expected.float()).abs() <= tolerance * expected.float().abs()).all()
