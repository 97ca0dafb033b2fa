"""Compiling the package's small C kernels (ovis2/kernels/*.c) once, at first use, into the cache directory.

A kernel is built with the system's C compiler (`cc`, or `$CC`) and kept under `cache_root()/kernels`, named by
a hash of its source, the package headers it includes (`#include "name.h"`, from the same folder), the compiler
and the flags, so a changed kernel, header or compiler builds anew and processes compiling at once each install a
whole file. Callers load the result with ctypes and fall back to PyTorch where
building fails (OSError: no compiler; subprocess.SubprocessError: it refused the source or the flags).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .demo import cache_root

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
BF16_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def compiled(source: Path, flags: tuple[str, ...] = BF16_FLAGS) -> Path:
    """The shared library built from `source` with `flags`, compiling it if the cache has none."""
    compiler = os.environ.get("CC", "cc")
    text = source_text(source)
    tag = hashlib.sha256(text + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source.stem}-{tag}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *flags, str(source), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def source_text(source: Path) -> bytes:
    """`source` followed by every package header it includes, directly or through another header (each once)."""
    seen: list[Path] = []
    pending = [source]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.append(path)
        names = LOCAL_INCLUDE.findall(path.read_bytes())
        pending.extend(path.parent / name.decode() for name in reversed(names))
    return b"".join(path.read_bytes() for path in seen)


def autograd_sees(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these: oneDNN's ops and the compiled kernels leave no graph, so
    PyTorch's own ops must compute it."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kernel_may_take(*tensors: torch.Tensor) -> bool:
    """Every tensor a CPU bf16 tensor autograd does not watch: what the bf16 kernels compute on."""
    plain = all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    return plain and not autograd_sees(*tensors)


def threads_for(work_items: int) -> int:
    """OpenMP threads for a kernel call splitting `work_items` (rows, sequences): torch's, at most one per item."""
    return max(1, min(torch.get_num_threads(), work_items))


def has_avx512_bf16() -> bool:
    """Whether this CPU has the AVX512-BF16 instructions the bf16 kernels are built for."""
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return supported is not None and bool(supported())


def has_avx2() -> bool:
    """Whether this CPU has AVX2 and FMA (torch's AVX2 capability requires both), or more."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def checked_library(
    source: Path,
    signatures: dict,
    agrees: Callable[[ctypes.CDLL], bool],
    switch: str,
    what: str,
    cpu_has: Callable[[], bool] = has_avx512_bf16,
    flags: tuple[str, ...] = BF16_FLAGS,
) -> ctypes.CDLL | None:
    """`source` built with `flags` and loaded with its functions' ctypes `signatures` ({name: (argtypes,
    restype)}), or None where it should not or cannot run: the environment variable `switch` is 0, `cpu_has()`
    (the instructions it is built for) is false, the build fails, or `agrees(library)` (its self-test against
    PyTorch) is false. Logged once per caller."""
    if os.environ.get(switch, "1") == "0" or not cpu_has():
        return None
    try:
        library = load(compiled(source, flags), signatures)
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("%s unavailable, PyTorch computes them: %s", what, error)
        return None
    if not agrees(library):
        logger.warning("%s disagree with PyTorch on this machine; PyTorch computes them", what)
        return None
    return library


def load(path: Path, signatures: dict) -> ctypes.CDLL:
    """The shared library at `path`, its functions given their ctypes {name: (argtypes, restype)}."""
    library = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library
