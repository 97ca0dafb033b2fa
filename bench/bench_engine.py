"""Engine throughput vs `generate()` one request at a time, side by side in one run (CPU, tiny checkpoint).

    .venv/bin/python -m bench.bench_engine [--requests 32] [--concurrency 16] [--output-tokens 32] [--threads N]
                                           [--dtype float32|bfloat16]

Both paths get the same prepared requests (the processor runs before timing), the same checkpoint and
fixed output lengths (eos ignored). Reports output tokens/s of each and their ratio, for requests with
one 600x900 image each and for text-only requests.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.input_processor import load_processor
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams


def make_conversations(count: int, with_image: bool, seed: int = 0) -> list[list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    conversations = []
    for index in range(count):
        text = f"Request {index}: describe what you see in detail, please, and list the main colours."
        content = [{"type": "text", "text": text}]
        if with_image:
            pixels = torch.randint(0, 256, (900, 600, 3), generator=generator, dtype=torch.uint8).numpy()
            content.insert(0, {"type": "image", "image": Image.fromarray(pixels)})
        conversations.append([{"role": "user", "content": content}])
    return conversations


def run_sequential(model, requests, output_tokens: int) -> float:
    """generate() one request at a time; returns seconds."""
    start = time.perf_counter()
    for inputs in requests:
        pixels = torch.cat([i.pixel_values for i in inputs.images]) if inputs.images else None
        out = model.generate(
            input_ids=torch.tensor([inputs.prompt_token_ids]),
            pixel_values=pixels,
            max_new_tokens=output_tokens,
            do_sample=False,
            eos_token_id=[-1],
        )
        assert out.shape[1] == len(inputs.prompt_token_ids) + output_tokens
    return time.perf_counter() - start


def run_engine(engine: LLMEngine, requests, output_tokens: int) -> float:
    """All requests added at once; the scheduler keeps max_num_seqs of them running. Returns seconds."""
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    for index, inputs in enumerate(requests):
        engine.add_request(f"bench-{time.monotonic_ns()}-{index}", inputs, params)
    done = 0
    while engine.has_unfinished_requests:
        done += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert done == len(requests) * output_tokens
    return time.perf_counter() - start


def compare(engine, processor, with_image: bool, args) -> dict:
    requests = [processor.prepare_chat(c) for c in make_conversations(args.requests, with_image)]
    warm = requests[:2]
    run_engine(engine, warm, 2)
    run_sequential(engine.core.model, warm[:1], 2)
    engine.core.block_manager.reset_prefix_cache()
    engine.core.runner.visual.cache.entries.clear()
    engine_s = run_engine(engine, requests, args.output_tokens)
    sequential_s = run_sequential(engine.core.model, requests, args.output_tokens)
    tokens = args.requests * args.output_tokens
    return {
        "workload": "one 600x900 image" if with_image else "text only",
        "prompt_tokens_each": len(requests[0].prompt_token_ids),
        "engine_tok_s": round(tokens / engine_s, 1),
        "sequential_tok_s": round(tokens / sequential_s, 1),
        "ratio": round(sequential_s / engine_s, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--text-only", action="store_true", help="skip the image workload")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="both sides' dtype"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    engine_args = EngineArgs(
        model=args.model,
        dtype=args.dtype,
        device="cpu",
        max_num_seqs=args.concurrency,
        kv_cache_memory=64 * 1024 * 1024,
    )
    engine = LLMEngine(engine_args)
    processor = load_processor(engine_args)
    workloads = [False] if args.text_only else [True, False]
    results = [compare(engine, processor, with_image, args) for with_image in workloads]
    print(
        json.dumps(
            {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "dtype": args.dtype,
                "output_tokens": args.output_tokens,
                "torch_threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
