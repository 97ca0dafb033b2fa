"""This server vs `transformers serve` on the same checkpoint and workload, in one run; prints the ratios.

The speed goal: 32 chat requests at concurrency 16, one 600x900 image each, 32 output tokens, streamed;
ours >= 5x transformers serve's output tokens/s with a lower p99 TTFT; text-only also >= 5x.
The servers run one after the other (never together), each warmed up before it is measured.

    python -m bench.side_by_side                      # the demo checkpoint, on this machine's device
    python -m bench.side_by_side --model /ckpt/Ovis2-2B-shaped --dtype bfloat16 --output-json bench/out/sbs.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from .client import Endpoint
from .metrics import summarize
from .report import machine_info, write_json
from .runner import LoadSpec, run_load
from .workload import WorkloadSpec, build_workload

OUTPUT_RATIO_GOAL = 5.0
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class ServerUnderTest:
    name: str
    argv: list[str]
    extra_body: dict  # what makes every answer exactly `output_tokens` long on this server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixed_length_body(name: str, output_tokens: int) -> dict:
    if name == "ours":
        return {"ignore_eos": True, "temperature": 0.0}
    config = {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False}
    return {"generation_config": json.dumps(config)}  # transformers serve rejects ignore_eos


def ovis2_serve_command() -> list[str]:
    script = BIN / "ovis2-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server"]


def servers(args: argparse.Namespace, model: str, dtype: str) -> list[ServerUnderTest]:
    ours = [
        *ovis2_serve_command(),
        "--model",
        model,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        *args.ours_args,
    ]
    theirs = [str(BIN / "transformers"), "serve", model, "--dtype", dtype, "--host", "127.0.0.1"]
    return [
        ServerUnderTest("ours", ours, fixed_length_body("ours", args.output_tokens)),
        ServerUnderTest("transformers", theirs, fixed_length_body("transformers", args.output_tokens)),
    ]


def wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def served_model(base_url: str) -> str:
    return httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]


def workloads(args: argparse.Namespace) -> dict[str, WorkloadSpec]:
    image = WorkloadSpec(
        num_requests=args.num_requests,
        input_words=args.input_words,
        output_tokens=args.output_tokens,
        image_sizes=((args.image_width, args.image_height),),
        images_per_request=1,
        seed=args.seed,
    )
    return {"image": image, "text": replace(image, image_sizes=(), images_per_request=0)}


def measure(endpoint: Endpoint, spec: WorkloadSpec, concurrency: int, warmup: int) -> dict:
    load = LoadSpec(max_concurrency=concurrency, show_progress=True)
    warm = replace(spec, num_requests=warmup, seed=spec.seed + 1)
    asyncio.run(run_load(endpoint, build_workload(warm), replace(load, show_progress=False)))
    results, duration = asyncio.run(run_load(endpoint, build_workload(spec), load))
    return summarize(results, duration)


def bench_server(server: ServerUnderTest, args: argparse.Namespace, log_dir: Path) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{server.name}.log"
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as log:
        argv = [*server.argv, "--port", str(port)]
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(base_url, process, args.startup_timeout)
            endpoint = Endpoint(
                url=base_url + "/v1/chat/completions",
                model=served_model(base_url),
                extra_body=server.extra_body,
            )
            return {
                name: measure(endpoint, spec, args.concurrency, args.warmup_requests)
                for name, spec in workloads(args).items()
            }
        finally:
            stop(process)


def ratios(ours: dict, theirs: dict) -> dict:
    output_ratio = ours["output_throughput"] / max(theirs["output_throughput"], 1e-9)
    return {
        "output_throughput_ratio": output_ratio,
        "p99_ttft_ratio": theirs["p99_ttft_ms"] / max(ours["p99_ttft_ms"], 1e-9),
        "meets_output_goal": output_ratio >= OUTPUT_RATIO_GOAL,
        "lower_p99_ttft": ours["p99_ttft_ms"] < theirs["p99_ttft_ms"],
        "all_completed": ours["failed"] == 0 and theirs["failed"] == 0,
    }


def format_comparison(name: str, ours: dict, theirs: dict, ratio: dict) -> str:
    rows = [f"---- {name} ----", f"{'':<24}{'ours':>12}{'transformers':>14}{'ratio':>9}"]
    rows.append(
        f"{'output tok/s':<24}{ours['output_throughput']:>12.1f}{theirs['output_throughput']:>14.1f}"
        f"{ratio['output_throughput_ratio']:>8.1f}x"
    )
    rows.append(
        f"{'p99 TTFT (ms)':<24}{ours['p99_ttft_ms']:>12.0f}{theirs['p99_ttft_ms']:>14.0f}"
        f"{ratio['p99_ttft_ratio']:>8.1f}x"
    )
    for key, label in (
        ("p50_tpot_ms", "p50 TPOT (ms)"),
        ("p99_e2el_ms", "p99 E2E (ms)"),
        ("failed", "failed"),
    ):
        rows.append(f"{label:<24}{ours[key]:>12.0f}{theirs[key]:>14.0f}")
    goal = (
        "MET"
        if ratio["meets_output_goal"] and ratio["lower_p99_ttft"] and ratio["all_completed"]
        else "NOT MET"
    )
    rows.append(f"goal (>= {OUTPUT_RATIO_GOAL:.0f}x output tok/s, lower p99 TTFT, no errors): {goal}")
    return "\n".join(rows)


def resolve_model_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    from ovis2.dtypes import dtype_name, resolve_dtype
    from ovis2.random_checkpoint import demo_checkpoint_dir
    from ovis2.weights import resolve_device

    model = str(demo_checkpoint_dir()) if args.model == "demo" else args.model
    dtype = args.dtype if args.dtype != "auto" else dtype_name(resolve_dtype("auto", resolve_device("auto")))
    return model, dtype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="checkpoint directory (-hf layout) or 'demo'")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="both servers (auto: as ovis2-serve resolves it, then the same for both)",
    )
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--image-width", type=int, default=600)
    parser.add_argument("--image-height", type=int, default=900)
    parser.add_argument("--input-words", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--warmup-requests", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--ours-args", nargs=argparse.REMAINDER, default=[], help="extra ovis2-serve flags (last)"
    )
    parser.add_argument("--output-json", type=Path, default=Path("bench/out/side_by_side.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, dtype = resolve_model_and_dtype(args)
    log_dir = args.output_json.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    measured = {server.name: bench_server(server, args, log_dir) for server in servers(args, model, dtype)}
    comparison = {
        name: ratios(measured["ours"][name], measured["transformers"][name]) for name in measured["ours"]
    }
    for name, ratio in comparison.items():
        print(format_comparison(name, measured["ours"][name], measured["transformers"][name], ratio))
    command = " ".join(["python -m bench.side_by_side", *(sys.argv[1:] if argv is None else argv)])
    document = {
        "command": command,
        "machine": machine_info(),
        "model": model,
        "dtype": dtype,
        "settings": vars(args) | {"output_json": str(args.output_json)},
        "results": measured,
        "comparison": comparison,
    }
    write_json(document, args.output_json)
    return 0 if all(r["meets_output_goal"] and r["lower_p99_ttft"] for r in comparison.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
