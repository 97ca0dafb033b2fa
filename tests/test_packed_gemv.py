"""The compiled one-row product over oneDNN-packed bf16 weights (ovis2.packed_gemv): the same products as
oneDNN's within the reordered-sum bound, taken for one row only, read only from layouts it knows, and oneDNN's
products wherever the kernel cannot run (no compiler, switched off).

The kernel needs a CPU with AVX512-BF16 and a C compiler; the layout checks and fallbacks run everywhere oneDNN
packs bf16."""

from __future__ import annotations

import subprocess

import pytest
import torch

from ovis2 import native_build, packed_gemv
from ovis2.cpu_linear import Linear, onednn_packing_available, reordered_weight
from ovis2.fused_linear import fuse

from .linear_bounds import assert_near_reference
from .native_kernels import decided_anew

DECODE_SHAPES = [(1152, 896), (896, 4864), (4096, 896)]  # Ovis2-1B's qkv, down and a slice of gate/up


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    with decided_anew(packed_gemv, monkeypatch, tmp_path):
        yield monkeypatch


def packs_bf16() -> None:
    if not onednn_packing_available(torch.bfloat16):
        pytest.skip("oneDNN cannot pack bf16 weights on this CPU")


def kernel_runs() -> None:
    packs_bf16()
    if packed_gemv.kernel_library() is None:
        pytest.skip("the one-row kernel needs AVX512-BF16 and a C compiler")


def bf16(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_kernel_agrees_with_onednn_wherever_it_compiles(fresh_library):
    """A kernel that compiles but computes wrong is switched off at run time; here it fails the suite."""
    packs_bf16()
    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("the one-row kernel needs AVX512-BF16")
    try:
        library = native_build.load(native_build.compiled(packed_gemv.SOURCE), packed_gemv.SIGNATURES)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"no C compiler for the one-row kernel: {error}")
    assert packed_gemv.agrees_with_onednn(library)


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("rows_hint", [1, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_product_on_decode_shapes(shape, rows_hint, with_bias):
    kernel_runs()
    out_features, in_features = shape
    weight, x = bf16(*shape, seed=1), bf16(1, in_features, seed=2)
    bias = bf16(out_features, seed=3) if with_bias else None
    packed = reordered_weight(weight, rows_hint)
    product = packed_gemv.one_row_product(packed, weight)
    assert product is not None and product.accepts(x, bias)
    out = product(x, bias)
    assert out.shape == (1, out_features) and out.dtype == torch.bfloat16
    assert_near_reference(out, x, weight, bias)
    onednn = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    assert (out != onednn).float().mean() < 0.01  # a sum in another order may round the other way, rarely


def test_an_input_at_any_offset_and_leading_dimensions():
    kernel_runs()
    weight, bias = bf16(256, 896, seed=12), bf16(256, seed=13)
    product = packed_gemv.one_row_product(reordered_weight(weight, 16), weight)
    x = bf16(1, 1, 897, seed=14)[..., 1:]  # a view one element into its storage: odd 2-byte alignment
    assert x.is_contiguous() and x.data_ptr() % 4 == 2
    assert product.accepts(x, bias) and not product.accepts(bf16(2, 896), bias)
    out = product(x, bias)
    assert_near_reference(out, x.reshape(1, 896), weight, bias)


def test_layout_check_takes_only_the_packed_weight_it_was_given():
    packs_bf16()
    weight = bf16(256, 896, seed=4)
    packed = reordered_weight(weight, 16)
    assert packed_gemv.packed_block(packed, weight) in packed_gemv.BLOCKS
    assert packed_gemv.packed_block(packed, bf16(256, 896, seed=5)) is None  # another weight's values
    assert packed_gemv.packed_block(packed, weight.t().contiguous().view(256, 896)) is None
    same_values_strided = weight.t().contiguous().t()
    assert packed_gemv.packed_block(packed, same_values_strided) == packed_gemv.packed_block(packed, weight)


@pytest.mark.parametrize("shape", [(1000, 896), (256, 1000), (300, 96)])
def test_shapes_oneDNN_pads_are_left_to_oneDNN(shape):
    packs_bf16()
    weight = bf16(*shape, seed=6)
    assert packed_gemv.one_row_product(reordered_weight(weight, 16), weight) is None


def test_packed_linear_takes_the_kernel_for_one_row_only():
    kernel_runs()
    torch.manual_seed(7)
    module = Linear(896, 1152).to(torch.bfloat16).requires_grad_(False)
    weight, bias = module.weight.clone(), module.bias.clone()
    assert module.pack()
    assert module.one_row is not None
    calls = []
    kernel = module.one_row._kernel
    module.one_row._kernel = lambda *args: calls.append(args) or kernel(*args)
    for rows in (1, 3, 16):
        x = bf16(2, 1, rows, 896, seed=rows)[0]  # leading dimensions kept
        out = module(x)
        assert out.shape == (1, rows, 1152)
        assert_near_reference(out, x, weight, bias)
    assert len(calls) == 1
    module.unpack()
    assert module.one_row is None and torch.equal(module.weight, weight)
    assert module.pack(rows_hint=None) and module.one_row is None  # packed for many rows: no one-row product


def test_fused_group_takes_the_kernel_and_drops_it_on_release():
    kernel_runs()
    torch.manual_seed(8)
    members = [Linear(896, n).to(torch.bfloat16).requires_grad_(False) for n in (896, 128, 128)]
    weight = torch.cat([member.weight for member in members])
    bias = torch.cat([member.bias for member in members])
    group = fuse(members)
    assert group is not None and group.one_row is not None
    x = bf16(1, 896, seed=9)
    assert_near_reference(group(x), x, weight, bias)
    members[0].unpack()
    assert group.one_row is None and not group.active


def test_switched_off_means_no_kernel(fresh_library):
    fresh_library.setenv("OVIS2_NATIVE_GEMV", "0")
    assert packed_gemv.kernel_library() is None


def test_no_compiler_means_no_kernel_and_the_products_still_run(fresh_library, tmp_path):
    packs_bf16()
    fresh_library.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        native_build.compiled(packed_gemv.SOURCE)
    assert packed_gemv.kernel_library() is None
    torch.manual_seed(10)
    module = Linear(896, 1152).to(torch.bfloat16).requires_grad_(False)
    weight, bias = module.weight.clone(), module.bias.clone()
    assert module.pack() and module.one_row is None
    x = bf16(1, 896, seed=11)
    assert_near_reference(module(x), x, weight, bias)


def test_a_failing_compile_is_reported_not_raised(fresh_library, tmp_path):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'unknown option -mavx512bf16' >&2\nexit 1\n")
    compiler.chmod(0o755)
    fresh_library.setenv("CC", str(compiler))
    with pytest.raises(subprocess.SubprocessError, match="unknown option"):
        native_build.compiled(packed_gemv.SOURCE)
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_the_compiled_kernel_is_reused_from_the_cache(fresh_library, tmp_path):
    kernel_runs()
    first = native_build.compiled(packed_gemv.SOURCE)
    assert first.parent == tmp_path / "kernels"
    stamp = first.stat().st_mtime_ns
    assert native_build.compiled(packed_gemv.SOURCE) == first and first.stat().st_mtime_ns == stamp
