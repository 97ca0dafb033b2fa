"""Host memory the process may still take: the least of the machine's available memory and its cgroup's room (a
container's limit), so that a CPU load that cannot fit is refused with its sizes instead of being killed by the
kernel without a word (exit status 137)."""

from __future__ import annotations

from pathlib import Path

from .errors import Ovis2Error

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
GIB = 1 << 30


def available_bytes(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Bytes the process may still allocate, or None where neither bound can be read (not Linux)."""
    known = [room for room in (_meminfo_available(proc), _cgroup_room(proc, cgroup_root)) if room is not None]
    return min(known) if known else None


def check_fits(needed: int, what: str, advice: str) -> None:
    """Ovis2Error naming `what`, the sizes and `advice` when `needed` bytes are more than the host has left."""
    room = available_bytes()
    if room is not None and needed > room:
        raise Ovis2Error(
            f"{what} needs {needed / GIB:.2f} GiB but this host (or its container) has {room / GIB:.2f} GiB "
            f"available: {advice}"
        )


def _meminfo_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(proc: Path, cgroup_root: Path) -> int | None:
    """cgroup v2: memory.max less the group's anonymous memory (its file pages are the page cache, reclaimable)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
        path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        group = cgroup_root / path.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        return int(limit) - int(stat.get("anon", 0))
    except (OSError, ValueError, StopIteration, IndexError):
        return None
