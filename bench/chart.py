"""A PNG of a concurrency sweep: throughput and latency against the number of requests in flight."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("output_throughput", "output tokens/s"),
    ("request_throughput", "requests/s"),
    ("p99_ttft_ms", "p99 TTFT (ms)"),
    ("p99_tpot_ms", "p99 TPOT (ms)"),
)


def plot_sweep(runs: list[dict], path: Path, title: str = "") -> Path:
    """`runs` are result dicts holding `max_concurrency` and the summary keys in PANELS."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    from matplotlib import pyplot as plt

    positions = range(len(runs))  # evenly spaced, labelled with the concurrency ("all": unbounded)
    labels = [str(run["max_concurrency"] or "all") for run in runs]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.5))
    for axis, (key, label) in zip(axes, PANELS, strict=True):
        axis.plot(positions, [run[key] for run in runs], marker="o")
        axis.set_xticks(positions, labels)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
