"""The comparison table: output tok/s and p99 TTFT per load and server, with ours/vLLM and ours/transformers.

Both ratios are ours divided by the peer's: above 1 for tok/s means ours is faster; below 1 for TTFT means
ours answers first sooner. A peer that failed (install, start, a load) is a line under the table, never a gap
without a reason.
"""

from __future__ import annotations

import math

PEER_ORDER = ("ours", "vllm", "transformers")
PEER_TITLES = {"ours": "ours", "vllm": "vLLM", "transformers": "transformers"}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or not (math.isfinite(ours) and math.isfinite(theirs)) or theirs <= 0:
        return None
    return ours / theirs


def load_figures(server: dict, load_name: str) -> dict | None:
    """{'tok_s', 'p99_ttft_ms', 'p50_tpot_ms', 'failed', 'completed'} of the kept run, or None if none ran."""
    entry = (server.get("loads") or {}).get(load_name) or {}
    best = entry.get("best")
    if not best or not best.get("completed"):
        return None
    return {
        "tok_s": best["output_throughput"],
        "p99_ttft_ms": best["p99_ttft_ms"],
        "p50_tpot_ms": best["p50_tpot_ms"],
        "failed": best["failed"],
        "completed": best["completed"],
    }


def table_rows(results: dict, loads: list[dict]) -> list[dict]:
    """One row per load: every server's figures and ours' ratios to each peer that was asked for."""
    rows = []
    for load in loads:
        row = {"load": load["name"], "label": load["label"], "cache_hits": load.get("cache_hits", False)}
        figures = {name: load_figures(results[name], load["name"]) for name in PEER_ORDER if name in results}
        ours = figures.get("ours")
        for name, figure in figures.items():
            row[name] = figure
            if name != "ours":
                row[f"tok_s_ours_over_{name}"] = ratio(ours and ours["tok_s"], figure and figure["tok_s"])
                row[f"ttft_ours_over_{name}"] = ratio(
                    ours and ours["p99_ttft_ms"], figure and figure["p99_ttft_ms"]
                )
        rows.append(row)
    return rows


def failure_lines(results: dict) -> list[str]:
    lines = []
    for name in PEER_ORDER:
        server = results.get(name)
        if server is None:
            continue
        if server.get("error"):
            lines.append(f"{PEER_TITLES[name]}: {server['error']}")
        for load_name, entry in (server.get("loads") or {}).items():
            for index, run in enumerate(entry.get("runs") or []):
                if run.get("error"):
                    lines.append(f"{PEER_TITLES[name]} {load_name} run {index + 1}: {run['error']}")
                elif run.get("failed"):
                    errors = "; ".join(f"{n} x {e}" for e, n in (run.get("errors") or {}).items())
                    lines.append(
                        f"{PEER_TITLES[name]} {load_name} run {index + 1}: {run['failed']} of "
                        f"{run['failed'] + run['completed']} requests failed: {errors}"
                    )
                elif run.get("exact_length") is False:
                    lines.append(
                        f"{PEER_TITLES[name]} {load_name} run {index + 1}: some answers were not exactly "
                        "the asked length"
                    )
    return lines


def cache_lines(results: dict) -> list[str]:
    """Each kept run whose server reported prefix-cache hits: the share of its prompt tokens they covered."""
    lines = []
    for name in PEER_ORDER:
        for load_name, entry in ((results.get(name) or {}).get("loads") or {}).items():
            best = entry.get("best") or {}
            cached, prompt = best.get("total_cached_prompt_tokens") or 0, best.get("total_prompt_tokens") or 0
            if cached and prompt:
                lines.append(
                    f"{PEER_TITLES[name]} {load_name}: {cached} of {prompt} prompt tokens "
                    f"({cached / prompt:.0%}) came from the prefix cache"
                )
    return lines


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _columns(rows: list[dict]) -> list[str]:
    return [name for name in PEER_ORDER if any(name in row for row in rows)]


def format_markdown(rows: list[dict]) -> str:
    """A Markdown table (what goes into bench/RESULTS.md)."""
    names = _columns(rows)
    peers = [n for n in names if n != "ours"]
    head = ["load"] + [f"{PEER_TITLES[n]} tok/s" for n in names] + [f"ours/{PEER_TITLES[p]}" for p in peers]
    head += [f"{PEER_TITLES[n]} p99 TTFT ms" for n in names] + [f"TTFT ours/{PEER_TITLES[p]}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"]]
        cells += [_num((row.get(n) or {}).get("tok_s"), ".1f") for n in names]
        cells += [_num(row.get(f"tok_s_ours_over_{p}"), ".2f") for p in peers]
        cells += [_num((row.get(n) or {}).get("p99_ttft_ms"), ".0f") for n in names]
        cells += [_num(row.get(f"ttft_ours_over_{p}"), ".2f") for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_text(rows: list[dict], failures: list[str]) -> str:
    """The same table for a terminal: fixed-width columns, failures listed below it."""
    names = _columns(rows)
    peers = [n for n in names if n != "ours"]
    head = f"{'load':<18}" + "".join(f"{PEER_TITLES[n] + ' tok/s':>19}" for n in names)
    head += "".join(f"{'ours/' + PEER_TITLES[p]:>19}" for p in peers)
    head += "".join(f"{PEER_TITLES[n] + ' p99 TTFT':>22}" for n in names)
    head += "".join(f"{'TTFT ours/' + PEER_TITLES[p]:>24}" for p in peers)
    lines = [head]
    for row in rows:
        line = f"{row['load']:<18}" + "".join(
            f"{_num((row.get(n) or {}).get('tok_s'), '.1f'):>19}" for n in names
        )
        line += "".join(f"{_num(row.get(f'tok_s_ours_over_{p}'), '.2f'):>19}" for p in peers)
        line += "".join(f"{_num((row.get(n) or {}).get('p99_ttft_ms'), '.0f'):>22}" for n in names)
        line += "".join(f"{_num(row.get(f'ttft_ours_over_{p}'), '.2f'):>24}" for p in peers)
        lines.append(line)
    lines += [f"FAILED {line}" for line in failures]
    return "\n".join(lines)
