"""Send a workload at a fixed concurrency or a Poisson request rate (or both: rate-limited, capped)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from .client import Endpoint, RequestResult, send_request
from .workload import BenchRequest


@dataclass(frozen=True)
class LoadSpec:
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    request_rate: float = math.inf  # requests per second, Poisson arrivals; inf: all at once
    seed: int = 0
    timeout_s: float = 600.0
    show_progress: bool = True


async def arrivals(requests: list[BenchRequest], load: LoadSpec) -> AsyncIterator[BenchRequest]:
    """Yield requests spaced by exponential gaps (a Poisson process) at `load.request_rate`."""
    rng = random.Random(load.seed)
    for index, request in enumerate(requests):
        if index and math.isfinite(load.request_rate):
            await asyncio.sleep(rng.expovariate(load.request_rate))
        yield request


def make_client(load: LoadSpec, num_requests: int) -> httpx.AsyncClient:
    connections = load.max_concurrency or num_requests
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(load.timeout_s), limits=limits)


async def run_load(
    endpoint: Endpoint, requests: list[BenchRequest], load: LoadSpec
) -> tuple[list[RequestResult], float]:
    """Run every request; return the results in request order and the wall time of the run."""
    gate = asyncio.Semaphore(load.max_concurrency or len(requests) or 1)
    progress = tqdm(total=len(requests), disable=not load.show_progress, unit="req", leave=False)

    async def one(client: httpx.AsyncClient, request: BenchRequest) -> RequestResult:
        async with gate:
            result = await send_request(client, endpoint, request)
        progress.update(1)
        return result

    async with make_client(load, len(requests)) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(client, request)) async for request in arrivals(requests, load)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return list(results), duration
