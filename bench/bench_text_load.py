"""One engine, 16 fresh chat prompts at once, each answered with 32 tokens: the first (prefill) step, the whole
load and the batch-16 decode steps, best over rounds.

    .venv/bin/python -m bench.bench_text_load --model <Ovis2-1B-shaped -hf checkpoint> [--rounds 3]

To compare two builds on a noisy machine, run it from each one's tree in turn, alternating, e.g.
    git worktree add /tmp/before <rev>
    for i in 1 2 3; do for tree in /tmp/before "$PWD"; do
        (cd $tree && PYTHONPATH=$tree python -m bench.bench_text_load --model <checkpoint>); done; done
"""

from __future__ import annotations

import json
import statistics

import ovis2

from .bench_shared_prefix import chat_requests, engine_for, load_parser, run_load


def main(argv: list[str] | None = None) -> None:
    args = load_parser(__doc__.splitlines()[0], 3, "loads; the best of each figure is kept").parse_args(argv)
    engine, processor = engine_for(args)
    run_load(engine, chat_requests(processor, 500, 4, args.input_words), 4)  # warm-up
    firsts, loads, steps = [], [], []
    for round_index in range(args.rounds):
        requests = chat_requests(processor, 501 + round_index, args.requests, args.input_words)
        times = run_load(engine, requests, args.output_tokens)
        firsts.append(times.first_step_s)
        loads.append(times.load_s)
        steps += times.later_steps_s
    summary = {
        "package": ovis2.__file__,
        "best_first_step_s": round(min(firsts), 3),
        "best_load_s": round(min(loads), 3),
        "decode_step_ms_median": round(statistics.median(steps) * 1000, 1),
        "decode_step_ms_min": round(min(steps) * 1000, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
