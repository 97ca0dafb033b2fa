"""Host memory the process may still take: the least of the machine's available memory and its cgroup's room (a
container's limit), so that a CPU load that cannot fit is refused with its sizes instead of being killed by the
kernel without a word (exit status 137)."""

from __future__ import annotations

from pathlib import Path

from .errors import Ovis2Error

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
GIB = 1 << 30
NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a number near 2^63


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
    """The group's memory limit less its anonymous memory (its file pages are the page cache, reclaimable): cgroup
    v2's memory.max and anon, or v1's hierarchical limit and total_rss; None without a limit."""
    try:
        groups = dict(line.split(":", 2)[1:] for line in (proc / "self" / "cgroup").read_text().splitlines())
    except (OSError, ValueError):
        return None
    try:
        if "memory" in groups:
            stat = _stat(_group_dir(cgroup_root / "memory", groups["memory"]))
            limit, used = int(stat["hierarchical_memory_limit"]), int(stat["total_rss"])
        elif "" in groups:
            group = _group_dir(cgroup_root, groups[""])
            text = (group / "memory.max").read_text().strip()
            limit, used = (NO_LIMIT if text == "max" else int(text)), int(_stat(group).get("anon", 0))
        else:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return None if limit >= NO_LIMIT else limit - used


def _group_dir(hierarchy: Path, path: str) -> Path:
    """The group's directory; inside a container the hierarchy is often mounted at the group itself."""
    nested = hierarchy / path.lstrip("/")
    return nested if nested.is_dir() else hierarchy


def _stat(group: Path) -> dict[str, str]:
    return dict(line.split()[:2] for line in (group / "memory.stat").read_text().splitlines() if " " in line)
