"""What lending the shared chat-template prefix saves: the same engine with partial-block prefix hits on and off,
alternating in one process, on fresh text prompts each round (CPU).

    .venv/bin/python -m bench.bench_shared_prefix --model <checkpoint> [--dtype bfloat16] [--rounds 6]
                                                  [--requests 16] [--input-words 32] [--output-tokens 32]

Every round sends `--requests` chat requests at once, each one user message of random words (the peers bench's
text), and times the first step (the prompts' prefill) and the whole load. The default system turn and the user
header (14 tokens) are what the prompts share, so "on" lends those; a whole 16-token block is shared only when two
prompts open with the same two tokens (rare, and alike on and off).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.input_processor import load_processor
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams

from .workload import random_text


def chat_requests(processor, seed: int, count: int, words: int) -> list:
    rng = random.Random(seed)
    return [
        processor.prepare_chat([{"role": "user", "content": random_text(rng, words)}]) for _ in range(count)
    ]


@dataclass
class LoadTimes:
    first_step_s: float  # the prompts' prefill (the requests all added before it)
    load_s: float
    cached_tokens: int  # prompt tokens from the prefix cache
    later_steps_s: list[float]  # each step after the first


def run_load(engine: LLMEngine, requests: list, output_tokens: int) -> LoadTimes:
    """These requests run together to the end, greedy, each answered with `output_tokens` tokens."""
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    for index, inputs in enumerate(requests):
        engine.add_request(f"load-{time.monotonic_ns()}-{index}", inputs, params)
    first_step, cached, later, last = None, 0, [], start
    while engine.has_unfinished_requests:
        outputs = engine.step()
        now = time.perf_counter()
        if first_step is None:
            first_step = now - start
        else:
            later.append(now - last)
        last = now
        cached += sum(o.num_cached_tokens for o in outputs if o.finished)
    return LoadTimes(first_step, last - start, cached, later)


def load_parser(description: str, rounds: int, rounds_help: str) -> argparse.ArgumentParser:
    """The options of a load of fresh chat prompts run together on one CPU engine."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--input-words", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    return parser


def engine_for(args: argparse.Namespace):
    """(a CPU engine taking all of the load's requests at once, its processor)."""
    engine_args = EngineArgs(
        model=args.model,
        dtype=args.dtype,
        device="cpu",
        max_num_seqs=args.requests,
        kv_cache_memory=256 * 1024**2,
    )
    return LLMEngine(engine_args), load_processor(engine_args)


def main(argv: list[str] | None = None) -> None:
    args = load_parser(__doc__.splitlines()[0], 6, "rounds of one 'on' and one 'off' load").parse_args(argv)
    engine, processor = engine_for(args)
    run_load(engine, chat_requests(processor, 0, 4, args.input_words), 4)  # warm-up; caches the system turn
    rows = []
    for round_index in range(args.rounds):
        for lends in (True, False) if round_index % 2 == 0 else (False, True):
            engine.core.block_manager.lends_partial_blocks = lends
            requests = chat_requests(
                processor, 1000 + 2 * round_index + lends, args.requests, args.input_words
            )
            times = run_load(engine, requests, args.output_tokens)
            first_step, total, cached = times.first_step_s, times.load_s, times.cached_tokens
            rows.append(
                {"lends": lends, "first_step_s": first_step, "load_s": total, "cached_tokens": cached}
            )
            print(
                f"partial hits {'on ' if lends else 'off'}: first step {first_step:.2f} s, load {total:.2f} s, "
                f"{args.requests * args.output_tokens / total:.1f} tok/s, {cached} prompt tokens from the cache",
                flush=True,
            )
    summary = {
        name: {
            "best_load_s": min(r["load_s"] for r in rows if r["lends"] is lends),
            "best_first_step_s": min(r["first_step_s"] for r in rows if r["lends"] is lends),
        }
        for name, lends in (("on", True), ("off", False))
    }
    summary["load_off_over_on"] = summary["off"]["best_load_s"] / summary["on"]["best_load_s"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
