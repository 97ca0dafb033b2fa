"""The CUDA decode attention kernel (ovis2.triton_decode_attention), run on this CPU under Triton's interpreter:
attention over each sequence's blocks as float64 computes it, on the Ovis2 head layouts, uneven lengths, shuffled
blocks and several splits of a sequence's blocks (some past its end); what it does not take; and its check on a device
(the engine's decode steps through it: tests/engine/test_triton_attention_engine.py).

The interpreter runs fp32 and fp16 (numpy has no bf16); bf16 caches run on a GPU only, where `ready` checks them
(bench/gpu_session.sh)."""

from __future__ import annotations

import os

import pytest
import torch

from ovis2 import triton_decode_attention as tda
from tests.test_decode_attention import exact, paged_case

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the kernel on CPU tensors under Triton's interpreter (tests/conftest.py turns it on without a "
    "GPU); with one, tests/engine/test_decode_graphs_cuda.py checks it on the device",
)


# 2B-34B's heads (12 on 2 KV heads of 128), 1B's (14 on 2 of 64), plain multi-head, one KV head, blocks of 8.
LAYOUTS = [(12, 2, 128, 16), (14, 2, 64, 16), (4, 4, 16, 16), (7, 1, 48, 16), (6, 2, 32, 8)]
LENGTHS = [1, 16, 17, 300, 5]  # 300 keys: 19 blocks, several splits; the others' later splits are empty


@pytest.mark.parametrize("dtype, relative", [(torch.float32, 2**-18), (torch.float16, 2**-10)])
@pytest.mark.parametrize("heads, kv_heads, dim, block", LAYOUTS)
def test_attention_over_each_sequences_blocks(heads, kv_heads, dim, block, dtype, relative):
    case = paged_case(LENGTHS, heads, kv_heads, dim, dtype=dtype, block=block)
    assert tda.takes(*case)
    got = tda.paged_decode_attention(*case)
    truth = exact(*case)
    assert got.shape == case[0].shape and got.dtype == dtype
    assert (got.double() - truth).abs().max() <= relative * truth.abs().max()


def test_a_sequence_is_split_into_runs_of_blocks_and_combined(monkeypatch):
    case = paged_case([300, 2], 12, 2, 128, dtype=torch.float32)
    whole = tda.paged_decode_attention(*case)
    monkeypatch.setattr(tda, "TARGET_PROGRAMS", 10**9)  # one split a sequence
    assert (
        tda.paged_decode_attention(*case).double() - whole.double()
    ).abs().max() <= 1e-6 * whole.abs().max()


def test_keys_past_a_sequences_length_are_not_read():
    q, k_cache, v_cache, tables, lens = paged_case([3, 20], 14, 2, 64, seed=1, dtype=torch.float32)
    clean = tda.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    for row, length in enumerate(lens.tolist()):
        last = tables[row, (length - 1) // 16]
        k_cache[last, length % 16 :] = float("nan")
        v_cache[last, length % 16 :] = float("nan")
    k_cache[0], v_cache[0] = float("nan"), float("nan")  # the tables' padding entry
    assert torch.equal(tda.paged_decode_attention(q, k_cache, v_cache, tables, lens), clean)


def test_layouts_it_does_not_take():
    q, k_cache, v_cache, tables, lens = paged_case([5, 9], 12, 2, 64, dtype=torch.float32)
    wrong = [
        (q[:, :11], k_cache, v_cache, tables, lens),  # heads not a multiple of KV heads
        (torch.zeros(2, 34, 64), k_cache, v_cache, tables, lens),  # 17 query heads a KV head
        (q, k_cache, v_cache[:-1], tables, lens),  # caches of different shapes
        (q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), tables, lens),  # not contiguous
        (q, k_cache, v_cache, tables.int(), lens),  # int32 tables
        (q, k_cache, v_cache, tables[:1], lens),  # a table short
        (q, k_cache[:, :12].contiguous(), v_cache[:, :12].contiguous(), tables, lens),  # blocks of 12
    ]
    for args in wrong:
        assert not tda.takes(*args)
    assert tda.takes(q, k_cache, v_cache, tables, lens)
    assert tda.computed(q, k_cache, v_cache, tables, lens) is None  # CPU tensors: the CPU paths' work


def test_the_device_check_passes_where_the_kernel_is_right_and_fails_where_it_is_not(monkeypatch, caplog):
    check = tda.ready.__wrapped__
    assert check(torch.device("cpu"), torch.float32)
    real = tda.paged_decode_attention
    monkeypatch.setattr(tda, "paged_decode_attention", lambda *a: real(*a) * 1.01)
    assert not check(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(tda, "paged_decode_attention", lambda *a: 1 / 0)
    assert not check(torch.device("cpu"), torch.float32)
    assert "SDPA computes decode attention" in caplog.text


def test_a_layout_the_kernel_fails_on_falls_back_to_sdpa_from_then_on(monkeypatch, caplog):
    case = paged_case([5, 9], 12, 2, 64, dtype=torch.float32)
    assert tda.launched(*case) is not None
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(tda, "paged_decode_attention", broken)
    monkeypatch.setattr(tda, "_FAILED_LAYOUTS", set())
    assert tda.launched(*case) is None and tda.launched(*case) is None
    assert calls == [1] and "out of resources" in caplog.text  # tried once, then SDPA without trying
    other = paged_case([5, 9], 14, 2, 64, dtype=torch.float32)
    assert tda.launched(*other) is None and calls == [1, 1]  # another layout is tried on its own


def test_the_engine_checks_the_kernel_at_start_up_on_cuda_only(monkeypatch):
    from types import SimpleNamespace

    from ovis2.engine.model_loading import prepare_cuda_kernels

    checked = []
    monkeypatch.setattr(tda, "ready", lambda device, dtype: checked.append((device, dtype)) or True)
    weight = torch.zeros(1)
    cuda_model = SimpleNamespace(
        device=torch.device("cuda"), dtype=torch.bfloat16, parameters=lambda: iter([weight])
    )
    prepare_cuda_kernels(cuda_model)
    assert checked == [(weight.device, torch.bfloat16)]  # the device the weights are on
    prepare_cuda_kernels(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16))
    monkeypatch.setenv("OVIS2_TRITON_ATTENTION", "0")
    prepare_cuda_kernels(cuda_model)
    assert len(checked) == 1  # not on CPU, not when switched off
