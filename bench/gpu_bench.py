"""GPU throughput of the engine vs `generate()` one request at a time, on random weights of real Ovis2 shapes.

    python -m bench.gpu_bench                      # CUDA, Ovis2-2B shapes, bf16, concurrency 1/16/64
                                                   # graphs and eager, decode attention by Triton and SDPA
    python -m bench.gpu_bench --tiny --device cpu  # the same code path at tiny size (CI smoke test)

No network and no weights on a lent GPU: the checkpoint is built in memory with random weights (speed
does not depend on weight values); prompts are random token ids of --prompt-tokens, outputs are fixed at
--output-tokens (eos ignored). The baseline runs the same number of requests one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams
from ovis2.inputs import EngineInputs


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from ovis2.configuration import config_for_size
    from ovis2.demo import tiny_config
    from ovis2.random_checkpoint import random_model

    return random_model(tiny_config() if tiny else config_for_size("2B"), device=device).to(dtype)


def prompts(count: int, length: int, seed: int = 0) -> list[EngineInputs]:
    generator = torch.Generator().manual_seed(seed)
    return [
        EngineInputs(torch.randint(100, 150000, (length,), generator=generator).tolist())
        for _ in range(count)
    ]


def engine_tok_s(engine: LLMEngine, requests, output_tokens: int) -> tuple[float, float | None]:
    """(output tokens/s over the whole run, mean decode step ms once every request has its first token)."""
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
    _sync()
    start = time.perf_counter()
    for index, inputs in enumerate(requests):
        engine.add_request(f"gpu-{time.monotonic_ns()}-{index}", inputs, params)
    started: set[str] = set()
    decode_start, decode_steps = None, 0
    while engine.has_unfinished_requests:
        outputs = engine.step()
        if decode_start is not None:
            decode_steps += 1
        started.update(o.request_id for o in outputs if o.outputs[0].token_ids)
        if decode_start is None and len(started) == len(requests):
            _sync()
            decode_start = time.perf_counter()
    _sync()
    end = time.perf_counter()
    decode_ms = (end - decode_start) / decode_steps * 1000 if decode_steps else None
    return len(requests) * output_tokens / (end - start), decode_ms


def bandwidth_floor_ms(model, batch: int, context: int, bandwidth_tbs: float) -> float:
    """The fastest possible decode step: read every LLM weight once plus every sequence's KV (performance.md)."""
    text = model.config.text_config
    size = torch.empty((), dtype=model.dtype).element_size()
    llm = model.model.language_model
    weights = sum(p.numel() for p in {id(p): p for p in llm.parameters()}.values())
    weights += model.lm_head.weight.numel() if not model.config.tie_word_embeddings else 0
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * size
    return (weights * size + batch * context * kv_per_token) / (bandwidth_tbs * 1e12) * 1000


def sequential_tok_s(model, requests, output_tokens: int) -> float:
    _sync()
    start = time.perf_counter()
    for inputs in requests:
        ids = torch.tensor([inputs.prompt_token_ids], device=model.device)
        model.generate(input_ids=ids, max_new_tokens=output_tokens, do_sample=False, eos_token_id=[-1])
    _sync()
    return len(requests) * output_tokens / (time.perf_counter() - start)


def measure(engine: LLMEngine, model, concurrency: int, args, baseline: float) -> dict:
    engine.core.scheduler.max_num_seqs = concurrency
    for length in (args.prompt_tokens, args.prompt_tokens + args.output_tokens):  # capture the buckets first
        engine.core.block_manager.reset_prefix_cache()
        engine_tok_s(engine, prompts(concurrency, length, seed=1000 + length), 3)
    engine.core.block_manager.reset_prefix_cache()
    tok_s, step_ms = engine_tok_s(
        engine, prompts(concurrency, args.prompt_tokens, seed=concurrency), args.output_tokens
    )
    floor_ms = bandwidth_floor_ms(
        model, concurrency, args.prompt_tokens + args.output_tokens // 2, args.bandwidth_tbs
    )
    return {
        "concurrency": concurrency,
        "engine_tok_s": round(tok_s, 1),
        "ratio_vs_sequential": round(tok_s / baseline, 2),
        "decode_step_ms": None if step_ms is None else round(step_ms, 3),
        "bandwidth_floor_step_ms": round(floor_ms, 3),
        "step_over_floor": None if step_ms is None else round(step_ms / floor_ms, 2),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for a CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument(
        "--sequential-requests", type=int, default=4, help="baseline requests (one at a time)"
    )
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("graphs", "eager"),
        default=["graphs", "eager"],
        help="decode steps replayed as CUDA graphs (fixed shapes, eager on CPU) and/or eager",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=("kernel", "sdpa"),
        default=None,
        help="decode attention by the Triton kernel (ovis2/triton_decode_attention.py) and/or SDPA over the "
        "gathered context; default both on CUDA, where the kernel runs (elsewhere the choice changes nothing)",
    )
    parser.add_argument(
        "--bandwidth-tbs",
        type=float,
        default=3.0,
        help="memory bandwidth for the floor, TB/s (measured: H100 ~3.0, H200 ~4.3)",
    )
    args = parser.parse_args(argv)

    on_cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    model = build_model(args.tiny, args.device, dtype)
    kv_bytes = int(args.kv_cache_gib * 1024**3) if args.kv_cache_gib else None
    if kv_bytes is None and not on_cuda:
        kv_bytes = 256 * 1024 * 1024
    engine_args = EngineArgs(
        model="unused",
        dtype=str(dtype).split(".")[-1],
        device=args.device,
        max_num_seqs=max(args.concurrency),
        kv_cache_memory=kv_bytes,
        max_num_batched_tokens=max(4096, args.prompt_tokens),
    )
    from ovis2.tokenizer import build_tokenizer

    engine = LLMEngine(engine_args, model=model, tokenizer=build_tokenizer())
    engine_tok_s(engine, prompts(1, 16, seed=99), 4)  # warm-up
    baseline = sequential_tok_s(
        model, prompts(args.sequential_requests, args.prompt_tokens, seed=1), args.output_tokens
    )
    results = []
    for mode in args.modes:
        for attention in args.attention or (["kernel", "sdpa"] if on_cuda else ["kernel"]):
            os.environ["OVIS2_TRITON_ATTENTION"] = "1" if attention == "kernel" else "0"
            runner = engine.core.runner
            runner.decode_graphs = None
            # graphs captured anew (a graph keeps the attention it was captured with); on CPU the same shapes, eager
            if mode == "graphs":
                runner.enable_decode_graphs(engine.max_model_len, capture=on_cuda)
            for concurrency in args.concurrency:
                row = {
                    "mode": mode,
                    "attention": attention,
                    **measure(engine, model, concurrency, args, baseline),
                }
                # each row as it completes: kept if a time limit cuts the run
                print("row:", json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(
        json.dumps(
            {
                "device": device,
                "tiny": args.tiny,
                "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens,
                "sequential_tok_s": round(baseline, 1),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
