"""native_build: a kernel's cached build is named by its source and the package headers it includes."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from ovis2 import native_build


def write_kernel(folder, header_body: str):
    (folder / "shared.h").write_text(f'#include "inner.h"\n{header_body}\n')
    (folder / "inner.h").write_text("static inline int inner(void) { return 1; }\n")
    source = folder / "kernel.c"
    source.write_text(
        '#include <stdint.h>\n#include "shared.h"\nint kernel(void) { return inner() + twice(); }\n'
    )
    return source


def test_source_text_takes_each_included_header_once(tmp_path):
    source = write_kernel(tmp_path, "static inline int twice(void) { return 2; }")
    (tmp_path / "inner.h").write_text('#include "shared.h"\nstatic inline int inner(void) { return 1; }\n')
    text = native_build.source_text(source)
    assert text.count(b"int kernel(void)") == 1
    assert text.count(b"return 2;") == 1 and text.count(b"return 1;") == 1


def test_a_changed_header_builds_a_new_library(tmp_path, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("OVIS2_CACHE", str(tmp_path / "cache"))
    flags = ("-O1", "-shared", "-fPIC")
    source = write_kernel(tmp_path, "static inline int twice(void) { return 2; }")
    first = native_build.compiled(source, flags)
    assert native_build.compiled(source, flags) == first
    write_kernel(tmp_path, "static inline int twice(void) { return 3; }")
    second = native_build.compiled(source, flags)
    assert second != first
    library = native_build.load(second, {"kernel": ([], ctypes.c_int)})
    assert library.kernel() == 4


def test_the_avx2_kernels_load_wherever_they_can():
    """On a CPU with AVX2 (and FMA) and a compiler, each AVX2 kernel builds and passes its self-test: a kernel
    whose self-test fails turns itself off, which would otherwise only show as skipped tests."""
    import os

    from ovis2 import bf16_rows, cpu_linear, decode_attention, fused_pointwise, native_decode

    if not native_build.has_avx2() or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no AVX2 or no C compiler here")
    switched_off = [
        name for name, value in os.environ.items() if name.startswith("OVIS2_NATIVE_") and value == "0"
    ]
    if switched_off:
        pytest.skip(f"kernels switched off here: {switched_off}")
    assert decode_attention.kernel_library() is not None
    if not native_build.has_avx512_bf16():
        assert fused_pointwise.avx2_library() is not None
    if not cpu_linear.native_bf16_matmul():
        assert bf16_rows.kernel_library() is not None
        assert native_decode.compiled_stack() is not None
