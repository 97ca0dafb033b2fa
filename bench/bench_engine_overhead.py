"""The engine's CPU time per decode step outside the model: scheduling, input building, sampling, outputs.

    .venv/bin/python -m bench.bench_engine_overhead [--sequences 64] [--output-tokens 256] [--output-kind delta]

On a GPU a decode step of a 2B model at batch 64 needs about 1.5 ms of memory traffic (performance.md); the
Python around it must stay well under that or it becomes the bottleneck. This runs the engine on a model so
small (1 layer, hidden 32, a 4096-word head in place of the 151936-word one) that its compute is negligible,
and reports milliseconds per step inside `ModelRunner.execute` (input building + the model) and outside it,
and the outside part per sequence.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ovis2.demo import tiny_config
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams
from ovis2.inputs import EngineInputs
from ovis2.random_checkpoint import random_model
from ovis2.tokenizer import build_tokenizer

HEAD_WORDS = 4096


def build_engine(sequences: int) -> LLMEngine:
    text = dict(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = random_model(tiny_config(text=text))
    head = torch.randn(HEAD_WORDS, 32, generator=torch.Generator().manual_seed(1))
    model.compute_logits = lambda hidden: (hidden @ head.t()).float()  # ids < HEAD_WORDS only
    args = EngineArgs(
        model="unused",
        dtype="float32",
        device="cpu",
        max_num_seqs=sequences,
        kv_cache_memory=512 * 1024 * 1024,
        max_model_len=4096,
    )
    engine = LLMEngine(args, model=model, tokenizer=build_tokenizer())
    engine.core.runner.banned_ids = torch.zeros(
        0, dtype=torch.long
    )  # the special ids lie beyond the small head
    return engine


def run(engine: LLMEngine, sequences: int, output_tokens: int, tag: str, output_kind: str) -> int:
    generator = torch.Generator().manual_seed(len(tag))
    params = SamplingParams(
        max_tokens=output_tokens, ignore_eos=True, temperature=0.0, output_kind=output_kind
    )
    for index in range(sequences):
        prompt = torch.randint(100, HEAD_WORDS, (128,), generator=generator).tolist()
        engine.add_request(f"{tag}-{index}", EngineInputs(prompt), params)
    steps = 0
    while engine.has_unfinished_requests:
        engine.step()
        steps += 1
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument(
        "--output-kind",
        default="cumulative",
        choices=("cumulative", "delta"),
        help="delta: what the server asks for (outputs carry only what is new until the end)",
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Python around the model is single-threaded anyway
    try:
        print(json.dumps(measure(args.sequences, args.output_tokens, args.output_kind), indent=2))
    finally:
        torch.set_num_threads(threads)


def measure(sequences: int, output_tokens: int, output_kind: str = "cumulative") -> dict:
    engine = build_engine(sequences)
    run(engine, sequences, 4, "warm-up", output_kind)
    execute, inside = engine.core.runner.execute, [0.0]

    def timed_execute(scheduled):
        start = time.perf_counter()
        try:
            return execute(scheduled)
        finally:
            inside[0] += time.perf_counter() - start

    engine.core.runner.execute = timed_execute
    start = time.perf_counter()
    steps = run(engine, sequences, output_tokens, "timed", output_kind)
    total = time.perf_counter() - start
    outside = total - inside[0]
    return {
        "sequences": sequences,
        "output_tokens": output_tokens,
        "output_kind": output_kind,
        "steps": steps,
        "step_ms": round(total / steps * 1e3, 3),
        "execute_ms": round(inside[0] / steps * 1e3, 3),
        "outside_execute_ms": round(outside / steps * 1e3, 3),
        "outside_us_per_sequence": round(outside / steps / sequences * 1e6, 1),
    }


if __name__ == "__main__":
    main()
