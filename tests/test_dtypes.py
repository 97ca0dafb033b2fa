"""What `dtype="auto"` resolves to (ovis2.dtypes)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from bench.machine_load import cpu_flags
from ovis2.cpu_linear import native_bf16_matmul, packs_weights
from ovis2.dtypes import cpu_prefers_bf16 as prefers_bf16  # the real rule: bound before the session pins it
from ovis2.dtypes import resolve_dtype
from ovis2.errors import Ovis2Error

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name", ["auto", None])
def test_auto_is_bf16_where_the_device_computes_it_and_float32_on_other_cpus(monkeypatch, name):
    monkeypatch.setattr("ovis2.dtypes.cpu_prefers_bf16", lambda: True)
    assert resolve_dtype(name, CPU) == torch.bfloat16
    assert resolve_dtype(name, CUDA) == torch.bfloat16
    monkeypatch.setattr("ovis2.dtypes.cpu_prefers_bf16", lambda: False)
    assert resolve_dtype(name, CPU) == torch.float32
    assert resolve_dtype(name, CUDA) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_a_named_dtype_is_kept_whatever_the_cpu(monkeypatch, native):
    monkeypatch.setattr("ovis2.dtypes.cpu_prefers_bf16", lambda: native)
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype(torch.float16, CUDA) == torch.float16
    with pytest.raises(Ovis2Error, match="unknown dtype"):
        resolve_dtype("int8", CPU)


def test_bf16_counts_as_native_only_where_the_cpu_has_its_instructions(monkeypatch):
    """oneDNN also runs bf16 on plain AVX-512 (emulated): that alone must not make auto bf16."""
    monkeypatch.setattr("ovis2.dtypes.packs_weights", lambda dtype: True)
    monkeypatch.setattr("ovis2.cpu_linear.native_bf16_matmul", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not prefers_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert prefers_bf16()
    monkeypatch.setattr("ovis2.dtypes.packs_weights", lambda dtype: False)
    assert not prefers_bf16()


@pytest.mark.parametrize("kernel", [True, False])
def test_without_bf16_instructions_bf16_where_the_few_row_kernel_runs(monkeypatch, kernel):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr("ovis2.cpu_linear.native_bf16_matmul", lambda: False)
    monkeypatch.setattr("ovis2.bf16_rows.kernel_library", lambda: object() if kernel else None)
    assert prefers_bf16() == kernel


def test_on_this_machine_the_rule_follows_the_cpu_flags():
    flags = cpu_flags()
    if set(flags) & {"avx512_bf16", "amx_tile"}:
        assert prefers_bf16() == packs_weights(torch.bfloat16), flags
    else:  # the AVX2 kernel, where the CPU has AVX2 (x86 CPUs with it have FMA), a compiler is here and oneDNN
        # does not compute bf16 itself
        compiler = shutil.which(os.environ.get("CC", "cc")) is not None
        expected = "avx2" in flags and compiler and not native_bf16_matmul()
        assert prefers_bf16() == expected, flags
