"""What the machine is and how busy it was: `lscpu`'s model name and the load average sampled during a run.

On a shared 2-core machine other people's work moves every figure; the report states the load average seen
before the run (others alone) and during each server's measurement (others plus the server under test and
the load generator), so a reader can tell a busy-machine run from an idle one.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The matrix-relevant flags lscpu reports (AVX-512 BF16, AMX): what bf16 kernels can use."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512f", "amx", "avx2", "avx512_vnni")))


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def machine_description() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gib": round(memory_gib(), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


class LoadSampler:
    """The 1-minute load average every `interval_s` in a background thread; `window(start, end)` summarises."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self._stop.wait(self.interval_s)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)

    def window(self, start: float, end: float) -> dict | None:
        return summarize_loads([load for t, load in self.samples if start <= t <= end])


def summarize_loads(loads: list[float]) -> dict | None:
    if not loads:
        return None
    return {"min": min(loads), "mean": sum(loads) / len(loads), "max": max(loads), "samples": len(loads)}
