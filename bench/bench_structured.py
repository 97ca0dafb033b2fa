"""Structured outputs: what the grammar bitmask costs per decode step, at batch 16, with and without constraints.

    .venv/bin/python -m bench.bench_structured [--sequences 16] [--output-tokens 48] [--repeats 3] [--threads 1]

The demo model's shapes (tiny layers, the real 151936-word head and tokenizer), sampled at temperature 1 with a
seed per request. Two runs of the same batch: every request free, then every request under one JSON schema
whose strings are long enough that no answer ends inside the measured steps. Reported per decode step (the
prefill step left out): the whole engine step, and inside it the bitmask (each matcher filling its row, then
the one masking call) and the matchers taking their sampled tokens. Goal: bitmask + accept under 10% of a step.
The two kinds of batch run interleaved and the fastest run of each is kept: on a shared machine the step time
varies far more than the grammar's share of it (`--threads 1` steadies it).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import torch

from ovis2.demo import tiny_config
from ovis2.engine import sampler
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.structured.grammar import GrammarMatcher
from ovis2.inputs import EngineInputs
from ovis2.random_checkpoint import random_model
from ovis2.tokenizer import build_tokenizer

SCHEMA = {  # an extraction answer; long strings keep every answer going for the measured steps
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 120},
        "total_cents": {"type": "integer", "minimum": 0, "maximum": 999999},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "items": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 40}, "cents": {"type": "integer"}},
                "required": ["name", "cents"],
            },
        },
        "note": {"type": "string", "maxLength": 400},
    },
    "required": ["merchant", "total_cents", "currency", "items", "note"],
}


def build_engine(sequences: int) -> LLMEngine:
    model = random_model(tiny_config())
    args = EngineArgs(
        model="unused",
        dtype="float32",
        device="cpu",
        max_num_seqs=sequences,
        kv_cache_memory=256 * 1024 * 1024,
        max_model_len=4096,
    )
    return LLMEngine(args, model=model, tokenizer=build_tokenizer())


class Timers:
    """Seconds spent in the bitmask and in the matchers' accept, and per-step totals."""

    def __init__(self) -> None:
        self.bitmask = self.accept = 0.0

    @contextmanager
    def installed(self):
        apply, accept = sampler.apply_grammar_bitmask, GrammarMatcher.accept

        def timed_apply(logits, matchers):
            start = time.perf_counter()
            apply(logits, matchers)
            self.bitmask += time.perf_counter() - start

        def timed_accept(matcher, token_id):
            start = time.perf_counter()
            accepted = accept(matcher, token_id)
            self.accept += time.perf_counter() - start
            return accepted

        sampler.apply_grammar_bitmask, GrammarMatcher.accept = timed_apply, timed_accept
        try:
            yield self
        finally:
            sampler.apply_grammar_bitmask, GrammarMatcher.accept = apply, accept


def run(engine: LLMEngine, sequences: int, output_tokens: int, constrained: bool, tag: str) -> dict:
    """One batch to the end; per-step times of the decode steps (every step after the first)."""
    structured = {"json": SCHEMA} if constrained else None
    for index in range(sequences):
        prompt = torch.randint(100, 30000, (64,), generator=torch.Generator().manual_seed(index)).tolist()
        params = SamplingParams(
            max_tokens=output_tokens, seed=index, ignore_eos=not constrained, structured_outputs=structured
        )
        engine.add_request(f"{tag}-{index}", EngineInputs(prompt), params)
    engine.step()  # the prefill (and the first token)
    timers, steps, lengths = Timers(), 0, []
    with timers.installed():
        start = time.perf_counter()
        while engine.has_unfinished_requests:
            lengths += [len(o.outputs[0].token_ids) for o in engine.step() if o.finished]
            steps += 1
        total = time.perf_counter() - start
    return {
        "steps": steps,
        "step_ms": total / steps * 1e3,
        "bitmask_ms": timers.bitmask / steps * 1e3,
        "accept_ms": timers.accept / steps * 1e3,
        "min_output_tokens": min(lengths),
    }


def measure(sequences: int, output_tokens: int, repeats: int = 3) -> dict:
    engine = build_engine(sequences)
    engine.input_processor.grammars.compile(
        SamplingParams(structured_outputs={"json": SCHEMA}).structured_outputs
    )
    run(engine, sequences, 4, True, "warm-up")
    best: dict[str, dict] = {}
    for repeat in range(repeats):  # interleaved, best of each: the machine is shared
        for kind in ("free", "constrained"):
            figures = run(engine, sequences, output_tokens, kind == "constrained", f"{kind}-{repeat}")
            if kind not in best or figures["step_ms"] < best[kind]["step_ms"]:
                best[kind] = figures
    free, constrained = best["free"], best["constrained"]
    grammar_ms = constrained["bitmask_ms"] + constrained["accept_ms"]
    return {
        "sequences": sequences,
        "output_tokens": output_tokens,
        "threads": torch.get_num_threads(),
        "free": _rounded(free),
        "constrained": _rounded(constrained),
        "grammar_ms_per_step": round(grammar_ms, 3),
        "grammar_share_of_step": round(grammar_ms / constrained["step_ms"], 4),
        "grammar_share_of_free_step": round(grammar_ms / free["step_ms"], 4),
        "step_ms_added": round(constrained["step_ms"] - free["step_ms"], 3),
    }


def _rounded(figures: dict) -> dict:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in figures.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        print(json.dumps(measure(args.sequences, args.output_tokens, args.repeats), indent=2))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
