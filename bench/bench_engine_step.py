"""The engine's decode step and one crop through the vision tower, with the CPU linear dispatch and without.

    .venv/bin/python -m bench.bench_engine_step --model <-hf checkpoint> [--batches 1,16] [--dtype float32]

One process, one model: each measurement runs with ovis2.cpu_linear's dispatch and with every Linear on plain
F.linear, alternating (`--rounds` times, the best kept), so a busy machine slows both alike. A decode step is
the median over `--output-tokens` steps of `batch` text requests decoding together (the prefill step left out);
a crop is one 448x448 crop's vision tower + visual tokenizer + embedding lookup.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ovis2 import cpu_linear, modeling
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams

WORDS = "river dawn stone light wind tree sky field bird cloud road hill".split()


@contextmanager
def plain_linear(enabled: bool):
    """Every Linear module and the vocabulary projection on F.linear while enabled."""
    dispatch = cpu_linear.linear
    if enabled:
        cpu_linear.linear = modeling.linear = lambda x, weight, bias=None: F.linear(x, weight, bias)
    try:
        yield
    finally:
        cpu_linear.linear = modeling.linear = dispatch


def decode_step_ms(engine: LLMEngine, batch: int, output_tokens: int, seed: int) -> float:
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
    for index in range(batch):
        text = " ".join(rng.choice(WORDS) for _ in range(64))
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        engine.add_request(f"step-{seed}-{index}", engine.input_processor.chat_inputs(messages, None), params)
    times = []
    while engine.has_unfinished_requests:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def crop_seconds(model) -> float:
    pixels = torch.randn(1, 3, 448, 448)
    start = time.perf_counter()
    with torch.inference_mode():
        model.get_image_embeddings(pixels)
    return time.perf_counter() - start


def best_of_alternating(measure, rounds: int) -> dict[bool, float]:
    """{plain F.linear?: best of `rounds` calls of measure()}, the dispatch and F.linear taking turns."""
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for plain in (False, True):
            with plain_linear(plain):
                best[plain] = min(best[plain], measure())
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-crop", action="store_true")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(
        EngineArgs(
            model=args.model,
            dtype=args.dtype,
            device="cpu",
            max_num_seqs=max(batches),
            kv_cache_memory=1 << 30,
            enable_prefix_caching=False,
        )
    )
    decode_step_ms(engine, 1, 4, seed=-1)  # warm-up
    print(f"{args.dtype}, {torch.get_num_threads()} threads; best of {args.rounds} alternating rounds")
    seeds = itertools.count(1)
    for batch in batches:
        best = best_of_alternating(
            lambda batch=batch: decode_step_ms(engine, batch, args.output_tokens, next(seeds)), args.rounds
        )
        print(
            f"decode step, batch {batch:3d}: dispatch {best[False]:7.1f} ms  F.linear {best[True]:7.1f} ms"
            f"  ratio {best[True] / best[False]:.2f}x"
        )
    if not args.no_crop:
        model = engine.core.runner.model
        best = best_of_alternating(lambda: crop_seconds(model), args.rounds)
        print(
            f"one 448x448 crop:       dispatch {best[False]:7.2f} s   F.linear {best[True]:7.2f} s"
            f"   ratio {best[True] / best[False]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
