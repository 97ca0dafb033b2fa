"""Printing and saving results: a readable table on stdout, JSON with the command and the machine."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROWS = (
    ("completed", "Successful requests", "{:d}"),
    ("failed", "Failed requests", "{:d}"),
    ("duration_s", "Duration (s)", "{:.2f}"),
    ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.2f}"),
    ("goodput", "Goodput (req/s)", "{:.2f}"),
)
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpus": gpu_names(),
    }


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["ovis2-bench", *args])


def format_summary(run: dict) -> str:
    rate = run["request_rate"]
    rate = "all at once" if rate is None or not math.isfinite(rate) else rate
    lines = [f"==== concurrency {run['max_concurrency']}, request rate {rate} ===="]
    for key, label, fmt in ROWS:
        if key in run:
            lines.append(f"{label:<40}{fmt.format(run[key])}")
    for name, label in LATENCIES:
        stats = "  ".join(f"{k}={run[f'{k}_{name}_ms']:.1f}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{label + ' (ms)':<40}{stats}")
    for error, count in run.get("errors", {}).items():
        lines.append(f"  {count} x {error}")
    return "\n".join(lines)


def finite(value):
    """`value` with every NaN or infinite float as None: strict JSON parsers refuse NaN and Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def write_json(document: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(document), indent=2, default=str, allow_nan=False) + "\n")
    return path
