"""What the tests of the compiled kernels (packed_gemv, fused_pointwise, decode_attention) share: each module's
`kernel_library()` is cached per process; these decide it anew in a scratch cache, or skip where it cannot load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def decided_anew(module, monkeypatch, tmp_path) -> Iterator[None]:
    """`module.kernel_library()` compiled into an empty cache under tmp_path while inside; the process's own
    decision restored after."""
    monkeypatch.setenv("OVIS2_CACHE", str(tmp_path))
    module.kernel_library.cache_clear()
    try:
        yield
    finally:
        module.kernel_library.cache_clear()


def loaded_or_skip(module, what: str):
    library = module.kernel_library()
    if library is None:
        pytest.skip(f"{what}: no C compiler here, or not the instructions they are built for")
    return library
