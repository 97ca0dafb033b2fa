"""`ovis2-bench`: load-test any OpenAI-compatible chat endpoint (this server, `transformers serve`, vLLM).

Example, the speed goal's workload:
    ovis2-bench --base-url http://127.0.0.1:8000 --num-requests 32 --concurrency 16 \
        --image-size 600x900 --images-per-request 1 --output-tokens 32 --output-json bench/out/run.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import httpx

from .chart import plot_sweep
from .client import Endpoint
from .metrics import parse_slos, summarize
from .report import command_line, format_summary, machine_info, write_json
from .runner import LoadSpec, run_load
from .workload import WorkloadSpec, build_workload, parse_image_size


def add_target_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target")
    group.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    group.add_argument("--endpoint", default="/v1/chat/completions")
    group.add_argument("--model", default=None, help="model name; default: the first of GET /v1/models")
    group.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    group.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = latency)")
    group.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM extension)")
    group.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request")


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--num-requests", type=int, default=32)
    group.add_argument("--input-words", type=int, default=32, help="random words of text per request")
    group.add_argument("--output-tokens", type=int, default=32, help="max_tokens of every request")
    group.add_argument(
        "--image-size",
        action="append",
        type=parse_image_size,
        default=[],
        help="WIDTHxHEIGHT of random images; repeat to draw among sizes; none: text only",
    )
    group.add_argument("--images-per-request", type=int, default=1)
    group.add_argument(
        "--image-detail",
        choices=("low", "high", "auto"),
        default=None,
        help="image_url.detail, the OpenAI knob servers map to tiles per image",
    )
    group.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help="tiles per image, sent as max_tiles_per_image (this server's extension)",
    )
    group.add_argument("--seed", type=int, default=0)


def add_load_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load")
    group.add_argument("--concurrency", type=int, default=None, help="requests in flight at most")
    group.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    group.add_argument("--sweep-concurrency", default=None, help="comma-separated concurrencies, e.g. 1,4,16")
    group.add_argument("--warmup-requests", type=int, default=1, help="unmeasured requests sent first")
    group.add_argument(
        "--goodput",
        nargs="*",
        default=None,
        metavar="NAME:MS",
        help="latency targets for goodput: ttft:MS tpot:MS e2el:MS",
    )
    group.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output-json", type=Path, default=None)
    group.add_argument("--chart", type=Path, default=None, help="PNG of the concurrency sweep")
    group.add_argument("--label", default="", help="name of the server under test, stored in the JSON")
    group.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovis2-bench", description=__doc__.splitlines()[0])
    for add in (add_target_args, add_workload_args, add_load_args, add_output_args):
        add(parser)
    return parser


class BenchError(Exception):
    """A problem the user fixes (a missing key, no server): one line on stderr, exit status 2."""


def discover_model(base_url: str, api_key: str | None) -> str:
    url = base_url.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise BenchError(
            f"cannot reach {url} ({type(exc).__name__}: {exc}); is a server running at --base-url?"
        ) from None
    answered = f"GET {url} answered {response.status_code} {response.reason_phrase}"
    if response.status_code in (401, 403):
        if api_key:
            raise BenchError(f"{answered}; the --api-key was refused: pass the server's key")
        raise BenchError(f"{answered}; the server needs a key: pass --api-key KEY (or set OPENAI_API_KEY)")
    if response.status_code != 200:
        raise BenchError(f"{answered}; pass --model to skip the model lookup")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url} listed no model; pass --model") from None


def make_endpoint(args: argparse.Namespace) -> Endpoint:
    model = args.model or discover_model(args.base_url, args.api_key)
    extra = dict(args.extra_body) | ({"ignore_eos": True} if args.ignore_eos else {})
    if args.max_tiles is not None:
        extra["max_tiles_per_image"] = args.max_tiles
    url = args.base_url.rstrip("/") + args.endpoint
    return Endpoint(url=url, model=model, api_key=args.api_key, stream=not args.no_stream, extra_body=extra)


def workload_spec(args: argparse.Namespace, num_requests: int) -> WorkloadSpec:
    return WorkloadSpec(
        num_requests=num_requests,
        input_words=args.input_words,
        output_tokens=args.output_tokens,
        image_sizes=tuple(args.image_size),
        images_per_request=args.images_per_request,
        image_detail=args.image_detail,
        seed=args.seed,
    )


def concurrencies(args: argparse.Namespace) -> list[int | None]:
    if args.sweep_concurrency:
        return [int(item) for item in args.sweep_concurrency.split(",")]
    return [args.concurrency]


def run_one(args: argparse.Namespace, endpoint: Endpoint, concurrency: int | None) -> dict:
    load = LoadSpec(
        max_concurrency=concurrency,
        request_rate=args.request_rate,
        seed=args.seed,
        timeout_s=args.timeout,
        show_progress=not args.no_progress,
    )
    if args.warmup_requests:
        warmup_spec = replace(workload_spec(args, args.warmup_requests), seed=args.seed + 1)
        asyncio.run(run_load(endpoint, build_workload(warmup_spec), replace(load, show_progress=False)))
    requests = build_workload(workload_spec(args, args.num_requests))
    results, duration = asyncio.run(run_load(endpoint, requests, load))
    summary = summarize(results, duration, parse_slos(args.goodput))
    rate = (
        args.request_rate if math.isfinite(args.request_rate) else None
    )  # None: all at once (JSON has no inf)
    return {"max_concurrency": concurrency, "request_rate": rate} | summary


def run_benchmark(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    endpoint = make_endpoint(args)
    runs = [run_one(args, endpoint, concurrency) for concurrency in concurrencies(args)]
    return {
        "label": args.label,
        "command": command_line(argv),
        "machine": machine_info(),
        "model": endpoint.model,
        "url": endpoint.url,
        "stream": endpoint.stream,
        "workload": vars(workload_spec(args, args.num_requests)),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        document = run_benchmark(args, argv)
    except BenchError as exc:
        print(f"ovis2-bench: error: {exc}", file=sys.stderr)
        return 2
    for run in document["runs"]:
        print(format_summary(run))
    if args.output_json:
        write_json(document, args.output_json)
    if args.chart:
        plot_sweep(document["runs"], args.chart, title=f"{args.label or document['model']}")
    return 0 if any(run["completed"] for run in document["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
