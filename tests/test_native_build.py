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
