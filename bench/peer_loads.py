"""The loads every server gets alike, each run with fresh prompts and images, and how one run is measured.

- text at concurrency 1 and 16;
- one 448x448 image and one 600x900 image per request, at concurrency 8;
- a multi-turn chat that resends its image with the whole history each turn (a cache-hit load, reported
  apart): its first turn primes the caches and is not counted, the later turns are measured.

Every run of every load draws its own seed, so no two runs (nor the warm-up) share a prompt or an image: a
server's image cache can only hit inside the chat load, where it is meant to, and its prefix cache elsewhere only
on what every chat prompt starts with (the template's system turn): the report lists each kept run's cached
prompt tokens as its server reported them.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from dataclasses import dataclass

from .client import Endpoint, RequestResult
from .metrics import summarize
from .runner import LoadSpec, run_load
from .workload import (
    BenchRequest,
    WorkloadSpec,
    build_workload,
    image_data_url,
    image_part,
    random_image,
    random_text,
)


@dataclass(frozen=True)
class Load:
    name: str
    label: str
    concurrency: int
    num_requests: int  # conversations for a chat load
    image_size: tuple[int, int] | None = None  # (width, height); None: text only
    turns: int = 1  # > 1: a multi-turn chat; turn 1 primes, turns 2.. are measured
    cache_hits: bool = False

    @property
    def measured_requests(self) -> int:
        return self.num_requests * max(self.turns - 1, 1)


@dataclass(frozen=True)
class LoadSizes:
    text_c1: int = 4
    text_c16: int = 32
    image448: int = 16
    image600x900: int = 16
    chat_conversations: int = 8
    chat_turns: int = 3
    chat_image: tuple[int, int] = (448, 448)


def standard_loads(sizes: LoadSizes = LoadSizes()) -> list[Load]:
    w, h = sizes.chat_image
    return [
        Load("text-c1", "text, concurrency 1", 1, sizes.text_c1),
        Load("text-c16", "text, concurrency 16", 16, sizes.text_c16),
        Load("image448-c8", "one 448x448 image, concurrency 8", 8, sizes.image448, (448, 448)),
        Load("image600x900-c8", "one 600x900 image, concurrency 8", 8, sizes.image600x900, (600, 900)),
        Load(
            "chat-resend",
            f"multi-turn chat resending its {w}x{h} image, concurrency 8 (cache hits)",
            8,
            sizes.chat_conversations,
            sizes.chat_image,
            turns=sizes.chat_turns,
            cache_hits=True,
        ),
    ]


def run_seed(base_seed: int, load_name: str, run_index: int) -> int:
    """Distinct for every (load, run); run_index -1 is the warm-up."""
    return (base_seed * 1_000_003 + zlib.crc32(load_name.encode()) * 101 + run_index + 1) % (2**31)


def chat_turns(load: Load, seed: int, input_words: int, output_tokens: int) -> list[list[BenchRequest]]:
    """turns[k][i]: conversation i's (k+1)-th request, carrying the image in its first user message and the
    earlier turns (fixed assistant replies of output_tokens words) as history."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(load.num_requests):
        url = image_data_url(random_image(rng, load.image_size))
        texts = [random_text(rng, input_words) for _ in range(load.turns)]
        replies = [random_text(rng, output_tokens) for _ in range(load.turns - 1)]
        conversations.append((url, texts, replies))
    turns = []
    for k in range(load.turns):
        requests = []
        for url, texts, replies in conversations:
            messages = [
                {"role": "user", "content": [image_part(url, None), {"type": "text", "text": texts[0]}]}
            ]
            for j in range(1, k + 1):
                messages += [
                    {"role": "assistant", "content": replies[j - 1]},
                    {"role": "user", "content": texts[j]},
                ]
            requests.append(BenchRequest(messages=messages, max_tokens=output_tokens, num_images=1))
        turns.append(requests)
    return turns


def build_turns(load: Load, seed: int, input_words: int, output_tokens: int) -> list[list[BenchRequest]]:
    if load.turns > 1:
        return chat_turns(load, seed, input_words, output_tokens)
    spec = WorkloadSpec(
        num_requests=load.num_requests,
        input_words=input_words,
        output_tokens=output_tokens,
        image_sizes=(load.image_size,) if load.image_size else (),
        images_per_request=1 if load.image_size else 0,
        seed=seed,
    )
    return [build_workload(spec)]


def measured_turns(load: Load) -> range:
    return range(1, load.turns) if load.turns > 1 else range(1)


def measure_run(
    endpoint: Endpoint, load: Load, seed: int, input_words: int, output_tokens: int, timeout_s: float = 900.0
) -> dict:
    """One run of `load`: its turns one after the other; the summary covers the measured turns only."""
    spec = LoadSpec(max_concurrency=load.concurrency, show_progress=False, timeout_s=timeout_s)
    results: list[RequestResult] = []
    duration = 0.0
    measured = measured_turns(load)
    for index, requests in enumerate(build_turns(load, seed, input_words, output_tokens)):
        turn_results, turn_s = asyncio.run(run_load(endpoint, requests, spec))
        if index in measured:
            results += turn_results
            duration += turn_s
    summary = summarize(results, duration)
    summary["seed"] = seed
    summary["exact_length"] = all(r.output_tokens == output_tokens for r in results if r.success)
    return summary


def warm_up(endpoint: Endpoint, input_words: int, output_tokens: int, seed: int, images: bool = True) -> None:
    """Text requests (one alone, then 4 at once) and, if images are measured, one 448x448 image (every crop is
    448x448, so larger images add no new vision shape), so first-call costs (compilation, allocation) are
    not measured."""
    warm = [Load("warm-text-1", "", 1, 1), Load("warm-text-4", "", 4, 4)]
    warm += [Load("warm-image", "", 1, 1, (448, 448))] if images else []
    for load in warm:
        measure_run(endpoint, load, run_seed(seed, load.name, -1), input_words, min(output_tokens, 4))


def best_run(runs: list[dict]) -> dict | None:
    """The run with the most output tokens/s among those with no failed request (else among all)."""
    if not runs:
        return None
    clean = [r for r in runs if r.get("failed", 1) == 0 and r.get("completed", 0) > 0]
    return max(clean or runs, key=lambda r: r.get("output_throughput", 0.0))
