"""Decode attention read in place from the paged KV cache by the compiled kernel (ovis2.decode_attention): SDPA's
values over the gathered context within bf16 rounding, on the Ovis2 head layouts, uneven lengths and shuffled
blocks; the engine's decode path takes it; SDPA wherever it cannot run.

The kernel needs a C compiler and a CPU with AVX512-BF16 or AVX2 (built for each); the fallbacks are checked
everywhere."""

from __future__ import annotations

import pytest
import torch

from ovis2 import decode_attention, layers
from ovis2.layers import PagedAttentionMetadata, paged_attention

from .native_kernels import decided_anew, loaded_or_skip

BLOCK = 16


@pytest.fixture(scope="module")
def library():
    return loaded_or_skip(decode_attention, "the decode attention kernel")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    with decided_anew(decode_attention, monkeypatch, tmp_path):
        yield monkeypatch


def paged_case(lengths, heads, kv_heads, dim, seed=0, dtype=torch.bfloat16, block=BLOCK):
    """Caches holding each sequence's keys in shuffled blocks (block 0 unused, as the engine's padding entry)."""
    generator = torch.Generator().manual_seed(seed)
    counts = [(n + block - 1) // block for n in lengths]
    order = (torch.randperm(sum(counts), generator=generator) + 1).tolist()
    tables, taken = [], 0
    for count in counts:
        tables.append(order[taken : taken + count] + [0] * (max(counts) - count))
        taken += count
    shape = (sum(counts) + 1, block, kv_heads, dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    q = torch.randn(len(lengths), heads, dim, generator=generator).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(lengths)


def exact(q, k_cache, v_cache, tables, lens) -> torch.Tensor:
    """The same attention in float64 over the same bf16 inputs."""
    return decode_attention.reference(q.double(), k_cache.double(), v_cache.double(), tables, lens)


def assert_rounded_from(got: torch.Tensor, truth: torch.Tensor, values: torch.Tensor) -> None:
    """got is truth computed in fp32 and rounded to bf16 once: half a bf16 step (2^-8 relative) of each value,
    plus fp32 sums' error, a few float32 ulps of the values' scale. (PyTorch's own SDPA on the gathered context
    misses this bound where outputs are small: it rounds the attention weights to bf16 before summing values.)"""
    allowed = 2**-8 * truth.abs() + 64 * torch.finfo(torch.float32).eps * values.double().abs().max()
    assert ((got.double() - truth).abs() <= allowed).all(), (got.double() - truth).abs().max()


# Ovis2-1B's language model (14 query heads on 2 KV heads of 64), 2B-34B's (head_dim 128), plain multi-head,
# the kernel's limits (16 query heads a KV head, head_dim 256), with the engine's block size and others.
LAYOUTS = [(14, 2, 64, 16), (12, 2, 128, 16), (4, 4, 16, 16), (32, 2, 256, 7), (16, 1, 256, 1), (8, 8, 16, 5)]


@pytest.mark.parametrize("heads, kv_heads, dim, block", LAYOUTS)
def test_the_kernel_is_attention_over_the_context_rounded_once(library, heads, kv_heads, dim, block):
    case = paged_case([1, 16, 17, 300, 5], heads, kv_heads, dim, block=block)
    got = decode_attention.decode_attention(*case)
    assert got is not None and got.shape == case[0].shape and got.dtype == torch.bfloat16
    assert_rounded_from(got, exact(*case), case[2])


def test_keys_past_a_sequences_length_are_not_read(library):
    """Poisoned entries after each length (in its last block and the padding block 0) change nothing."""
    q, k_cache, v_cache, tables, lens = paged_case([3, 20], 14, 2, 64, seed=1)
    clean = decode_attention.decode_attention(q, k_cache, v_cache, tables, lens)
    for row, length in enumerate(lens.tolist()):
        last = tables[row, (length - 1) // BLOCK]
        k_cache[last, length % BLOCK :] = float("nan")
        v_cache[last, length % BLOCK :] = float("nan")
    k_cache[0], v_cache[0] = float("nan"), float("nan")
    assert torch.equal(decode_attention.decode_attention(q, k_cache, v_cache, tables, lens), clean)


def test_the_engine_decode_path_takes_the_kernel_and_is_no_less_exact_than_sdpa(library, monkeypatch):
    lengths = [7, 40]
    q, k_cache, v_cache, tables, lens = paged_case(lengths, 14, 2, 64, seed=2)
    new_k = torch.randn(2, 2, 64).to(torch.bfloat16)
    new_v = torch.randn(2, 2, 64).to(torch.bfloat16)
    slots = torch.tensor(
        [tables[i, (n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for i, n in enumerate(lengths)]
    )
    meta = PagedAttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor([0, 1, 2]),
        seq_lens=lens,
        block_tables=tables,
        max_query_len=1,
        max_seq_len=max(lengths),
        kv_caches=[(k_cache, v_cache)],
    )
    calls = []
    monkeypatch.setattr(
        layers, "decode_attention", lambda *a: calls.append(1) or decode_attention.decode_attention(*a)
    )
    with torch.inference_mode():
        got = paged_attention(q, new_k, new_v, meta, layer=0)
        monkeypatch.setattr(layers, "decode_attention", lambda *a: None)
        expected = paged_attention(q, new_k, new_v, meta, layer=0)
    assert calls == [1]
    truth = exact(q, k_cache, v_cache, tables, lens)
    assert_rounded_from(got, truth, v_cache)
    assert (got.double() - truth).abs().mean() <= (expected.double() - truth).abs().mean()


def test_the_self_test_passes_wherever_the_kernel_compiles(library):
    assert decode_attention.agrees_with_reference(library)


def test_shapes_and_dtypes_the_kernel_does_not_take_fall_back():
    assert decode_attention.decode_attention(*paged_case([4], 4, 2, 16, dtype=torch.float32)) is None
    assert (
        decode_attention.decode_attention(*paged_case([4], 4, 2, 8)) is None
    )  # head_dim not a multiple of 16
    assert (
        decode_attention.decode_attention(*paged_case([4], 34, 2, 16)) is None
    )  # 17 query heads per KV head


def test_tables_that_point_outside_the_cache_are_refused_not_read(library):
    q, k_cache, v_cache, tables, lens = paged_case([20], 4, 2, 16)
    assert (
        decode_attention.decode_attention(q, k_cache, v_cache, tables, torch.tensor([40])) is None
    )  # > 2 blocks
    assert decode_attention.decode_attention(q, k_cache, v_cache, tables, torch.tensor([0])) is None
    far = tables.clone()
    far[0, 1] = k_cache.shape[0]
    assert decode_attention.decode_attention(q, k_cache, v_cache, far, lens) is None
    two_tables = tables.repeat(2, 1)  # for one query
    assert decode_attention.decode_attention(q, k_cache, v_cache, two_tables, lens) is None
    assert decode_attention.decode_attention(q, k_cache, v_cache, tables, lens) is not None


def test_autograd_takes_sdpa():
    q, k_cache, v_cache, tables, lens = paged_case([4], 4, 2, 16)
    assert decode_attention.decode_attention(q.requires_grad_(True), k_cache, v_cache, tables, lens) is None


def test_switched_off_means_no_kernel(fresh_library):
    fresh_library.setenv("OVIS2_NATIVE_ATTENTION", "0")
    assert decode_attention.kernel_library() is None
    assert decode_attention.decode_attention(*paged_case([4], 4, 2, 16)) is None


def test_built_for_the_instructions_this_cpu_has(fresh_library):
    """AVX512-BF16 flags where the CPU has them, then AVX2's if that build fails; AVX2's alone where the CPU has only
    those (an AVX-512 build would die with SIGILL there); nothing where it has neither."""
    native_build = decode_attention.native_build
    flags_used = []

    def refusing_compiled(source, flags):
        flags_used.append(flags)
        raise OSError("not built in this test")

    fresh_library.setattr(native_build, "compiled", refusing_compiled)
    for avx512_bf16, avx2, expected in [
        (True, True, [native_build.BF16_FLAGS, native_build.AVX2_FLAGS]),
        (False, True, [native_build.AVX2_FLAGS]),
        (False, False, []),
    ]:
        flags_used.clear()
        fresh_library.setattr(native_build, "has_avx512_bf16", lambda value=avx512_bf16: value)
        fresh_library.setattr(native_build, "has_avx2", lambda value=avx2: value)
        decode_attention.kernel_library.cache_clear()
        assert decode_attention.kernel_library() is None and flags_used == expected


def test_a_nan_key_makes_its_heads_output_nan_as_sdpa_does(library):
    """A NaN among the attended keys poisons the scores of the query heads reading it, as in SDPA: the kernel's
    own exponential keeps NaN NaN (it does not clamp it away with the scores below e^-87)."""
    q, k_cache, v_cache, tables, lens = paged_case([40], 4, 2, 16, seed=3)
    k_cache[tables[0, 1], 3, 1] = float("nan")  # key 19 of KV head 1
    got = decode_attention.decode_attention(q, k_cache, v_cache, tables, lens)
    assert got[0, 2:].isnan().all() and not got[0, :2].isnan().any()


def test_scores_far_below_the_top_weigh_nothing(library):
    """A key scoring 100 below the best gets weight e^-100 ~ 4e-44: nothing, as in SDPA, even beside a value of 3e38
    (a floor of e^-87 ~ 1.6e-38 on the weights would have added ~5 to the output)."""
    q, k_cache, v_cache, tables, lens = paged_case([20], 1, 1, 16, seed=4)
    q[:] = 1.0
    block = tables[0, 0]
    k_cache[block, :, 0] = 0.0
    k_cache[block, 0, 0] = 25.0  # key 0: score 25 * 16 / 4 = 100 above the others
    v_cache[block, 1, 0] = 3e38  # key 1, weighing e^-100
    got = decode_attention.decode_attention(q, k_cache, v_cache, tables, lens)[0, 0].float()
    expected = v_cache[block, 0, 0].float()  # key 0's value: all the weight is its
    assert ((got - expected).abs() <= 2**-7 * expected.abs() + 1e-30).all()
