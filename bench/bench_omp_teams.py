"""Why the engine's model lives on one thread: decode steps with one OpenMP thread team in the process vs two.

    .venv/bin/python -m bench.bench_omp_teams --model <-hf checkpoint> [--dtype bfloat16] [--rounds 3]

libgomp (torch's OpenMP on Linux) gives every thread that starts a parallel region a thread team of its own.
Once the process holds more OpenMP threads than cores, libgomp stops spinning between parallel regions and every
op pays a futex wake-up. This steps one batch-1 request in the main thread alone (one team), then alternates
the main thread and a second thread (two teams, the way the engine ran when its model was built in another
thread than the loop's). Prints the median step of each.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams


def median_step_ms(engine: LLMEngine, tag: str, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens + 1, ignore_eos=True, temperature=0.0)
    messages = [{"role": "user", "content": [{"type": "text", "text": f"river {tag} dawn stone " * 8}]}]
    engine.add_request(tag, engine.input_processor.chat_inputs(messages, None), params)
    times = []
    while engine.has_unfinished_requests:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3  # the prefill step left out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args(argv)
    engine = LLMEngine(EngineArgs(model=args.model, dtype=args.dtype, device="cpu", kv_cache_memory=1 << 30))
    one_team = [median_step_ms(engine, f"one{r}", args.tokens) for r in range(args.rounds)]
    jobs: queue.Queue[str] = queue.Queue()
    results: queue.Queue[float] = queue.Queue()

    def worker() -> None:
        while True:
            results.put(median_step_ms(engine, jobs.get(), args.tokens))

    threading.Thread(target=worker, daemon=True).start()
    main_thread, second_thread = [], []
    for r in range(args.rounds):
        jobs.put(f"second{r}")
        second_thread.append(results.get())
        main_thread.append(median_step_ms(engine, f"main{r}", args.tokens))
    print(f"{args.dtype}; median decode step at batch 1, ms (each of {args.rounds} rounds)")
    print(f"one team (main thread only):   {' '.join(f'{t:6.1f}' for t in one_team)}")
    print(f"two teams, main thread:        {' '.join(f'{t:6.1f}' for t in main_thread)}")
    print(f"two teams, second thread:      {' '.join(f'{t:6.1f}' for t in second_thread)}")
    print(f"ratio (two teams / one, best): {min(main_thread + second_thread) / min(one_team):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
