"""glibc's malloc in the server process: at most two heaps (arenas), and freed memory handed back to the system
whenever the engine runs out of work (and a second after a POST's response has gone out: memory the HTTP side frees
after the engine's last step, such as a slow reader's stream or a body refused while it loaded).

glibc gives threads that allocate at the same time heaps of their own, up to eight per core. In the server the
engine thread, the image-decoding threads and the event loop all allocate and free large buffers, and memory
freed in one heap is not reused by another: with the default, the RSS after a burst of 256 streams (half with
images) wandered by up to ~300 MB from one identical burst to the next. Two heaps steadied a server alone; after
the hostile-input and fault tests had run on it the same check still failed 1 time in 4 (~290 MB), until
`malloc_trim` ran when the engine went idle. The trim waits until the engine has been idle for a second
(`server.app.IDLE_TRIM_QUIET_SECONDS`): run at the last step it came before the finished requests were freed
(bench/RESULTS.md, "Server memory"). A trim takes ~1.5 ms on a 1B model's server, ~30 ms after a 256-stream burst.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's arenas at `count`; False, changing nothing, for 0 (glibc's default), where MALLOC_ARENA_MAX is
    already set (the operator's choice wins) or where the C library has no mallopt."""
    if count == 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        logger.info("this C library has no mallopt: --malloc-arena-max is ignored")
        return False
    if mallopt(M_ARENA_MAX, count) != 1:
        logger.warning("mallopt(M_ARENA_MAX, %d) failed: glibc keeps its default heaps", count)
        return False
    return True


def release_free_memory() -> None:
    """Hand the free pages of every heap back to the system (glibc's malloc_trim); nothing elsewhere."""
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


@cache
def _libc_function(name: str, argtypes: tuple):
    """The C library's `name` returning an int, looked up once; None where it has none (musl, macOS, Windows)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function
