"""The engine's decode step and one crop through the vision tower, with its CPU linears (cpu_linear: the
dispatch, and weights packed for oneDNN where the engine packs them) and with plain F.linear.

    .venv/bin/python -m bench.bench_engine_step --model <-hf checkpoint> [--batches 1,16] [--dtype float32]

One process, one model: each measurement runs with the engine's linears and with every Linear unpacked on plain
F.linear, alternating (`--rounds` times, the best kept), so a busy machine slows both alike. A decode step is
the median over `--output-tokens` steps of `batch` text requests decoding together (the prefill step left out);
a crop is a 448x448 crop's vision tower + visual tokenizer + embedding lookup, two crops in one call (as the
engine batches the crops of a request), per crop.
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

from ovis2 import cpu_linear
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams

WORDS = "river dawn stone light wind tree sky field bird cloud road hill".split()


@contextmanager
def plain_linear(model, enabled: bool):
    """Every Linear module of `model` unpacked and on F.linear while enabled; packed again after."""
    dispatch = cpu_linear.linear
    if enabled:
        for module in model.modules():
            if isinstance(module, cpu_linear.Linear):
                module.unpack()
        cpu_linear.linear = lambda x, weight, bias=None: F.linear(x, weight, bias)
    try:
        yield
    finally:
        cpu_linear.linear = dispatch
        if enabled:
            model.pack_cpu_weights()


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


def crop_seconds(model, crops: int = 2) -> float:
    """Seconds per crop of `crops` crops encoded together, after one warm-up call (oneDNN builds its kernels for
    new shapes on first use, and the weights were just repacked)."""
    pixels = torch.randn(crops, 3, 448, 448)
    with torch.inference_mode():
        model.get_image_embeddings(pixels)
        start = time.perf_counter()
        model.get_image_embeddings(pixels)
    return (time.perf_counter() - start) / crops


def warm_engine(model: str, dtype: str, max_batch: int) -> LLMEngine:
    """A CPU engine for batches up to `max_batch` (no prefix caching: every request prefills), after one short
    request."""
    engine = LLMEngine(
        EngineArgs(
            model=model,
            dtype=dtype,
            device="cpu",
            max_num_seqs=max_batch,
            kv_cache_memory=1 << 30,
            enable_prefix_caching=False,
        )
    )
    decode_step_ms(engine, 1, 4, seed=-1)
    return engine


def best_of_alternating(model, measure, rounds: int) -> dict[bool, float]:
    """{plain F.linear?: best of `rounds` calls of measure()}, the engine's linears and F.linear taking turns."""
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for plain in (False, True):
            with plain_linear(model, plain):
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
    engine = warm_engine(args.model, args.dtype, max(batches))
    print(f"{args.dtype}, {torch.get_num_threads()} threads; best of {args.rounds} alternating rounds")
    model = engine.core.runner.model
    packed = sum(m.packed_weight is not None for m in model.modules() if isinstance(m, cpu_linear.Linear))
    print(f"{packed} Linear weights packed for oneDNN")
    seeds = itertools.count(1)
    for batch in batches:
        best = best_of_alternating(
            model,
            lambda batch=batch: decode_step_ms(engine, batch, args.output_tokens, next(seeds)),
            args.rounds,
        )
        print(
            f"decode step, batch {batch:3d}: ours {best[False]:7.1f} ms  F.linear {best[True]:7.1f} ms"
            f"  ratio {best[True] / best[False]:.2f}x"
        )
    if not args.no_crop:
        best = best_of_alternating(model, lambda: crop_seconds(model), args.rounds)
        print(
            f"448x448 crop (of 2):    ours {best[False]:7.2f} s   F.linear {best[True]:7.2f} s"
            f"   ratio {best[True] / best[False]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
