"""This server vs vLLM's CPU build (and optionally `transformers serve`) on the Ovis2-1B shapes, one after another.

    python -m bench.peers --install-peers                      # ours vs vLLM, vLLM installed on first use
    python -m bench.peers --peers vllm,transformers            # all three
    python -m bench.peers --size 2B --runs 3 --output-json bench/out/peers-2b.json

Random-weight bf16 checkpoints of the exact shapes are built once into a cache folder (-hf for ours and
transformers, the original AIDC layout for vLLM: bench.peer_checkpoints). The servers run one at a time on
the same loads (bench.peer_loads): text at concurrency 1 and 16, one 448x448 and one 600x900 image per request
at concurrency 8, and a multi-turn chat resending its image (cache hits, reported apart); each load runs
`--runs` times with fresh prompts and images and the best run is kept; streamed, every answer exactly
`--output-tokens` long. Prints output tok/s and p99 TTFT with ours/vLLM and ours/transformers, the machine
floors (bench.machine_floor) against ours' batch-1 step, and writes JSON and a Markdown block for RESULTS.md.
A peer that fails to install, start or run a load is a line in the report; the run goes on.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from .client import Endpoint
from .machine_load import LoadSampler, machine_description
from .peer_checkpoints import ensure_checkpoints, peers_cache_root
from .peer_install import PeerInstallError, install_vllm, installed_version, vllm_env
from .peer_loads import Load, LoadSizes, best_run, measure_run, run_seed, standard_loads, warm_up
from .peer_report import cache_lines, failure_lines, format_markdown, format_text, table_rows
from .peer_servers import (
    ServerFailed,
    ServerSettings,
    ServerSpec,
    ours_spec,
    served_model,
    start,
    transformers_spec,
    vllm_spec,
)
from .report import write_json
from .workload import parse_image_size

KNOWN_PEERS = ("vllm", "transformers")
REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_peers(text: str) -> list[str]:
    """'vllm,transformers' -> ['vllm', 'transformers']; '' or 'none' -> [] (ours alone)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in KNOWN_PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_PEERS)}"
        )
    return list(dict.fromkeys(names))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_chat_template(root: Path) -> Path:
    """Ours (the -hf checkpoints' template) for vLLM: the AIDC tokenizer has none."""
    from ovis2.tokenizer import CHAT_TEMPLATE

    path = root / "ovis2_chat_template.jinja"
    root.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != CHAT_TEMPLATE:
        path.write_text(CHAT_TEMPLATE)
    return path


def resolve_specs(args, pair, root: Path, log=print) -> tuple[list[ServerSpec], dict[str, str]]:
    """The specs of the servers that can run, and an error line for each asked-for peer that cannot."""
    settings = ServerSettings(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        threads=args.vllm_threads,
    )
    specs = [ours_spec(Path(sys.executable), pair.hf, settings, shlex.split(args.ours_args))]
    settings = replace(settings, dtype=args.peer_dtype or args.dtype)
    errors: dict[str, str] = {}
    if "vllm" in args.peers:
        env = vllm_env(root)
        try:
            if args.install_peers:
                env = install_vllm(root, log=log)
            elif installed_version(env) is None:
                raise PeerInstallError(f"not installed in {env.venv}: run with --install-peers")
            specs.append(
                vllm_spec(
                    env.python, pair.aidc, write_chat_template(root), settings, shlex.split(args.vllm_args)
                )
            )
        except (PeerInstallError, OSError) as error:
            errors["vllm"] = f"install failed: {error}"
    if "transformers" in args.peers:
        cli = Path(sys.executable).parent / "transformers"
        if cli.is_file():
            specs.append(
                transformers_spec(
                    cli, pair.hf, settings, args.output_tokens, shlex.split(args.transformers_args)
                )
            )
        else:
            errors["transformers"] = f"not installed: no {cli}"
    return specs, errors


def bench_server(
    spec: ServerSpec, loads: list[Load], args, log_dir: Path, sampler: LoadSampler, log=print, progress=None
) -> dict:
    """Start, warm up, run every load `args.runs` times, stop. Never raises: failures are in the result."""
    port = free_port()
    result = {"command": shlex.join(spec.command(port)), "env": spec.env, "error": None, "loads": {}}
    began = time.time()
    try:
        server = start(spec, port, log_dir / f"{spec.name}.log", args.startup_timeout)
    except ServerFailed as error:
        result["error"] = f"failed to start: {error}"
        return result
    result["startup_s"] = time.time() - began
    measured_from = time.time()
    try:
        try:
            model = served_model(server.base_url)
        except Exception:  # noqa: BLE001 - a peer without /v1/models still gets the served name
            model = "ovis2"
        endpoint = Endpoint(
            url=server.base_url + "/v1/chat/completions", model=model, extra_body=spec.extra_body
        )
        log(f"[{spec.name}] up in {result['startup_s']:.0f} s; warming up")
        warm_up(endpoint, args.input_words, args.output_tokens, args.seed, any(x.image_size for x in loads))
        for load in loads:
            runs = []
            for index in range(runs_of(load, args)):
                if server.process.poll() is not None:
                    runs.append({"error": f"server exited ({server.process.returncode})"})
                    break
                seed = run_seed(args.seed, load.name, index)
                try:
                    run = measure_run(
                        endpoint, load, seed, args.input_words, args.output_tokens, args.request_timeout
                    )
                except Exception as error:  # noqa: BLE001 - one load's failure is a line in the report
                    run = {"error": f"{type(error).__name__}: {error}"[:300]}
                runs.append(run)
                log(
                    f"[{spec.name}] {load.name} run {index + 1}: "
                    + (
                        run.get("error")
                        or f"{run['output_throughput']:.1f} tok/s, p99 TTFT {run['p99_ttft_ms']:.0f} ms,"
                        f" {run['failed']} failed"
                    )
                )
            best = best_run([r for r in runs if "error" not in r])
            result["loads"][load.name] = {"runs": runs, "best": best}
            if progress is not None:
                progress(result)
    except Exception as error:  # noqa: BLE001
        result["error"] = (
            f"{type(error).__name__}: {error} ({traceback.format_exc(limit=2).splitlines()[-1]})"
        )
    finally:
        server.stop()
        result["load_average"] = sampler.window(measured_from, time.time())
    if (
        server.process.returncode not in (0, -15, None)
        and not result["error"]
        and any("error" in run for entry in result["loads"].values() for run in entry["runs"])
    ):
        result["error"] = f"exited with {server.process.returncode}"
    return result


def runs_of(load: Load, args) -> int:
    return args.image_runs if load.image_size and load.turns == 1 and args.image_runs else args.runs


def bf16_note(machine: dict, dtype: str, peer_dtype: str) -> str | None:
    """bf16 without AVX-512-BF16 or AMX: torch's matmuls emulate it, several times slower than float32. Ours
    computes its bf16 weights in fp32 there (ovis2.bf16_rows, widened blocks); a peer in bf16 runs the emulation."""
    native = any(f in machine.get("cpu_flags", []) for f in ("avx512_bf16", "amx_bf16"))
    if native or dtype == peer_dtype == "float32":
        return None
    if peer_dtype == "bfloat16":
        return (
            "this CPU has no AVX-512-BF16 or AMX: the peers' bf16 matmuls are emulated (several times slower than "
            "float32), so their bf16 figures measure the emulation (--peer-dtype float32 runs them at their best)"
        )
    return (
        f"this CPU has no AVX-512-BF16 or AMX: the peers ran in {peer_dtype}, their fastest dtype here; ours "
        "keeps --dtype's weights and computes bf16 products in fp32 (where its AVX2 kernel builds)"
    )


def step_floor_lines(floor: dict | None, results: dict) -> list[str]:
    """Each server's batch-1 step (p50 TPOT at concurrency 1, over HTTP) against the bandwidth floor."""
    if not floor:
        return []
    lines = []
    for name, server in results.items():
        best = ((server.get("loads") or {}).get("text-c1") or {}).get("best")
        if best and best.get("completed"):
            step = best["p50_tpot_ms"]
            line = (
                f"{name}: batch-1 step {step:.1f} ms (p50 TPOT, text-c1) = "
                f"{step / floor['batch1_step_floor_ms']:.1f}x the {floor['batch1_step_floor_ms']:.1f} ms floor"
            )
            if floor.get("batch1_step_floor_read_ms"):
                read_floor = floor["batch1_step_floor_read_ms"]
                line += f" ({step / read_floor:.2f}x the {read_floor:.1f} ms read-bandwidth floor)"
            lines.append(line)
    return lines


def markdown_block(document: dict) -> str:
    machine, load = document["machine"], document["load_average"]
    lines = [
        f"**Command:** `{document['command']}`",
        "",
        f"**Machine:** {machine['cpu_model']}, {machine['cpu_count']} cores, {machine['memory_gib']} GiB, "
        f"{machine['platform']}, Python {machine['python']}; flags {' '.join(machine['cpu_flags'])}.",
    ]
    before = load.get("before")
    during = {n: s.get("load_average") for n, s in document["results"].items()}
    lines.append(
        "**Load average:** before the run "
        + (f"{before:.2f}" if before is not None else "n/a")
        + "; "
        + "; ".join(
            f"during {n} {w['mean']:.1f} (min {w['min']:.1f}, max {w['max']:.1f})"
            for n, w in during.items()
            if w
        )
        + "."
    )
    lines += ["", format_markdown(document["table"]), ""]
    if document.get("floor"):
        f = document["floor"]
        peaks = ", ".join(f"{n} {v * 1e3:.0f}" for n, v in f["matmul_peak_tflops_by_dtype"].items())
        lines.append(
            f"**Floors ({f['dtype']}):** copy bandwidth {f['copy_bandwidth_gb_s']:.1f} GB/s, "
            + (f"read {f['read_bandwidth_gb_s']:.1f} GB/s, " if f.get("read_bandwidth_gb_s") else "")
            + "GEMV "
            f"{f['gemv_bandwidth_gb_s']:.1f} GB/s, matmul peak {peaks} "
            f"GFLOP/s; batch-1 step floor {f['batch1_step_floor_ms']:.1f} ms "
            f"({f['decode_weight_bytes'] / 1e9:.2f} GB read per step); 448x448 crop floor "
            f"{f['crop_floor_ms']:.0f} ms ({f['crop_tflop']:.2f} TFLOP)."
        )
        lines += [f"- {line}" for line in document["step_vs_floor"]]
    lines += [f"- FAILED {line}" for line in document["failures"]]
    lines += [f"- CACHED {line}" for line in document.get("cache_hits", [])]
    lines += [f"- NOTE {line}" for line in document.get("notes", [])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--peers", type=parse_peers, default=["vllm"], help="vllm,transformers (default: vllm)"
    )
    parser.add_argument(
        "--install-peers", action="store_true", help="install vLLM's CPU build if it is missing"
    )
    parser.add_argument("--size", default="1B", choices=("1B", "2B"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/ovis2-serve/peers")
    parser.add_argument(
        "--runs", type=int, default=2, help="runs of each load, fresh prompts each; best kept"
    )
    parser.add_argument("--loads", default="", help="comma-separated subset of the load names (default: all)")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--input-words", type=int, default=32)
    parser.add_argument("--text-c1-requests", type=int, default=4)
    parser.add_argument("--text-c16-requests", type=int, default=32)
    parser.add_argument("--image448-requests", type=int, default=16)
    parser.add_argument("--image600x900-requests", type=int, default=16)
    parser.add_argument(
        "--image-runs", type=int, default=None, help="runs of the image loads (default: --runs)"
    )
    parser.add_argument("--chat-conversations", type=int, default=8)
    parser.add_argument(
        "--chat-turns", type=int, default=3, help="turn 1 primes the caches; the rest are measured"
    )
    parser.add_argument("--chat-image-size", type=parse_image_size, default=(448, 448))
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="every server's compute dtype (the checkpoints are bf16 on disk either way)",
    )
    parser.add_argument(
        "--peer-dtype",
        choices=("bfloat16", "float32"),
        help="the peers' compute dtype where it should differ from ours (default: --dtype); on a CPU without "
        "bf16 instructions vLLM and transformers emulate bf16, so float32 is their fastest there",
    )
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--kv-cache-gib", type=int, default=2, help="KV cache for every server that takes a size"
    )
    parser.add_argument("--vllm-threads", type=int, default=2, help="OMP_NUM_THREADS for vLLM")
    parser.add_argument("--ours-args", default="", help="extra ovis2-serve flags, one string")
    parser.add_argument("--vllm-args", default="", help="extra vLLM server flags, one string")
    parser.add_argument(
        "--transformers-args", default="", help="extra `transformers serve` flags, one string"
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-floor", action="store_true", help="skip the machine floor measurement")
    parser.add_argument("--output-json", type=Path, default=Path("bench/out/peers.json"))
    parser.add_argument("--output-md", type=Path, default=None, help="default: the JSON path with .md")
    return parser


def select_loads(args) -> list[Load]:
    sizes = LoadSizes(
        text_c1=args.text_c1_requests,
        text_c16=args.text_c16_requests,
        image448=args.image448_requests,
        image600x900=args.image600x900_requests,
        chat_conversations=args.chat_conversations,
        chat_turns=args.chat_turns,
        chat_image=args.chat_image_size,
    )
    loads = standard_loads(sizes)
    wanted = [n.strip() for n in args.loads.split(",") if n.strip()]
    unknown = set(wanted) - {load.name for load in loads}
    if unknown:
        raise SystemExit(
            f"unknown load(s) {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(load.name for load in loads)}"
        )
    return [load for load in loads if not wanted or load.name in wanted]


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so the running server's `finally` stops it


def main(argv: list[str] | None = None) -> int:
    import os
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "bench.peers", *(sys.argv[1:] if argv is None else argv)])
    loads = select_loads(args)
    note = bf16_note(machine_description(), args.dtype, args.peer_dtype or args.dtype)
    if note:
        print("NOTE", note, flush=True)
    root = args.cache_dir or peers_cache_root()
    log_dir = args.output_json.parent / "peers-logs"
    before = os.getloadavg()[0]
    sampler = LoadSampler().start()
    floor = None
    if not args.no_floor:
        from .machine_floor import floors, format_floors

        floor = floors(args.size, args.dtype)
        print(format_floors(floor), flush=True)
    pair = ensure_checkpoints(args.size, root)
    specs, errors = resolve_specs(args, pair, root)
    results = {name: {"error": error, "loads": {}} for name, error in errors.items()}
    machine = machine_description()

    def compose(partial: bool) -> dict:
        ordered = {n: results[n] for n in ("ours", *args.peers) if n in results}
        rows = table_rows(
            ordered, [{"name": x.name, "label": x.label, "cache_hits": x.cache_hits} for x in loads]
        )
        document = {
            "command": command,
            "machine": machine,
            "partial": partial,
            "notes": [n for n in [bf16_note(machine, args.dtype, args.peer_dtype or args.dtype)] if n],
            "load_average": {"before": before, "whole_run": sampler.window(0, time.time())},
            "checkpoints": {
                "size": args.size,
                "hf": str(pair.hf),
                "aidc": str(pair.aidc),
                "dtype": "bfloat16",
            },
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "loads": [vars(x) for x in loads],
            "floor": floor,
            "results": ordered,
            "table": rows,
            "failures": failure_lines(ordered),
            "cache_hits": cache_lines(ordered),
        }
        document["step_vs_floor"] = step_floor_lines(floor, ordered)
        return document

    for spec in specs:
        print(f"==== {spec.name}: {len(loads)} loads x {args.runs} runs ====", flush=True)
        results[spec.name] = {"error": None, "loads": {}}

        def progress(
            partial_result: dict, name: str = spec.name
        ) -> None:  # the JSON so far, after every load
            results[name] = partial_result
            write_json(compose(partial=True), args.output_json)

        results[spec.name] = bench_server(
            spec, loads, args, log_dir, sampler, log=lambda m: print(m, flush=True), progress=progress
        )
    sampler.stop()
    document = compose(partial=False)
    rows, failures = document["table"], document["failures"]
    print(format_text(rows, failures))
    for line in document["cache_hits"]:
        print("CACHED", line)
    for note in document["notes"]:
        print("NOTE", note)
    for line in document["step_vs_floor"]:
        print(line)
    write_json(document, args.output_json)
    md_path = args.output_md or args.output_json.with_suffix(".md")
    md_path.write_text(markdown_block(document))
    print(f"wrote {args.output_json} and {md_path}")
    ours = document["results"].get("ours", {})
    return 0 if not ours.get("error") and ours.get("loads") else 2


if __name__ == "__main__":
    sys.exit(main())
