"""--malloc-arena-max: glibc makes no more heaps than the cap, counted by malloc_stats() in a fresh process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

THREADS_ALLOCATING = """
import ctypes, sys, threading
from server.malloc_policy import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])))
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
start = threading.Barrier(6)
def allocate():
    start.wait()
    [libc.malloc(1 << 16) for _ in range(64)]
threads = [threading.Thread(target=allocate) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.malloc_stats()
"""


ROOT = Path(__file__).resolve().parents[2]
ALLOCATOR_SETTINGS = ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")  # would decide the count instead


def arenas_after_six_threads(cap: int) -> tuple[str, int]:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's arenas")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", THREADS_ALLOCATING, str(cap)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    return done.stdout.strip(), done.stderr.count("Arena ")


def test_the_cap_holds_while_threads_allocate():
    applied, arenas = arenas_after_six_threads(2)
    assert applied == "True" and arenas == 2


def test_zero_keeps_glibcs_default():
    applied, arenas = arenas_after_six_threads(0)
    assert applied == "False" and arenas > 2  # one heap per thread here: the cap above is what held it


def test_an_operators_malloc_arena_max_wins(monkeypatch):
    from server.malloc_policy import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False
