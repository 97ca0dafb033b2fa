"""This machine's floors: memory copy bandwidth, matmul peak, and what they allow the Ovis2 shapes.

    python -m bench.machine_floor                       # floors for the 1B shapes
    python -m bench.machine_floor --size 2B --model <-hf checkpoint>  # also our engine's measured batch-1 step

- copy bandwidth: bytes read + bytes written per second by `dst.copy_(src)` over 512 MiB (best of N);
- read bandwidth: bytes read per second by a sum over 512 MiB (a decode step reads its weights, writes little);
- GEMV: an [8192, 8192] weight times one vector, weight bytes per second (what batch-1 decode does);
- matmul peak: the best TFLOP/s of square and vision-tower-shaped products, bf16 and float32;
- batch-1 decode step floor = bytes of LLM weights one step reads (the tied embedding is read again as the
  output projection) / copy bandwidth; the vision crop floor = one 448x448 crop's FLOPs / matmul peak.
With --model, our engine decodes one request alone and its median step time is printed against the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """GB/s (1e9 bytes) moved by a copy, counting the read and the write."""
    src = torch.ones(mib << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / seconds / 1e9


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """GB/s read by a sum over `mib` MiB of float32: what a decode step only does with its weights (a copy's
    figure counts its writes too; on a 2-core Zen 5 a copy moved 39-57 GB/s and a sum read 41-45)."""
    values = torch.ones((mib << 20) // 4, dtype=torch.float32)
    seconds = best_seconds(values.sum, repeats)
    return values.numel() * 4 / seconds / 1e9


def gemv_bandwidth(rows: int = 8192, cols: int = 8192, repeats: int = 10, dtype=torch.bfloat16) -> float:
    """GB/s of weight bytes read by a matrix-vector product (batch-1 decode's operation)."""
    weight = torch.randn(rows, cols).to(dtype)
    vector = torch.randn(1, cols).to(dtype)
    seconds = best_seconds(lambda: torch.nn.functional.linear(vector, weight), repeats)
    return weight.numel() * weight.element_size() / seconds / 1e9


# The vision tower's products for one crop (1024 patches): FFN up/gate, FFN down, fused qkv. Each is ~6 GFLOP, so
# an emulated bf16 (a few GFLOP/s on a CPU without bf16 units) still finishes in seconds.
MATMUL_SHAPES = ((1024, 1024, 2816), (1024, 2816, 1024), (1024, 1024, 3072))


def matmul_peak(shapes=MATMUL_SHAPES, repeats: int = 2, dtype=torch.bfloat16) -> dict:
    """TFLOP/s per (m, k, n) product in `dtype` and the best of them."""
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        seconds = best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e12
    return {"per_shape_tflops": per_shape, "peak_tflops": max(per_shape.values())}


def decode_weight_bytes(config, bytes_per_param: int = 2) -> int:
    """LLM weights one batch-1 decode step reads: every layer, the final norm and the output projection (for a
    tied model the embedding matrix, read in full as lm_head; the embedding lookup itself reads one row)."""
    t = config.text_config
    kv = t.num_key_value_heads * t.head_dim
    attention = (
        t.hidden_size * t.hidden_size * 2 + t.hidden_size * kv * 2 + t.hidden_size + 2 * kv
    )  # q,o + k,v + bias
    mlp = 3 * t.hidden_size * t.intermediate_size
    per_layer = attention + mlp + 2 * t.hidden_size
    params = t.num_hidden_layers * per_layer + t.hidden_size + t.vocab_size * t.hidden_size
    return params * bytes_per_param


def crop_flops(config) -> float:
    """FLOPs of one 448x448 crop through the vision tower and the visual head (matmuls only)."""
    v = config.vision_config
    tokens = v.num_patches_per_side**2
    d, inner = v.hidden_size, v.intermediate_size
    per_layer = 2 * tokens * d * (4 * d + 3 * inner) + 2 * 2 * tokens * tokens * d
    patch = 2 * tokens * d * 3 * v.patch_size**2
    head = 2 * v.tokens_per_crop * d * v.hidden_stride**2 * (v.vocab_size - 5)
    return v.num_hidden_layers * per_layer + patch + head


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def floors(size: str = "1B", dtype: str = "bfloat16", repeats: int = 5) -> dict:
    """The floors for `size` computing in `dtype` (weights read per step at that dtype's width); the matmul peak
    is measured in both dtypes, since a CPU without bf16 units emulates bf16 far below its float32 peak. There
    the engine computes bf16 products in fp32 (ovis2.cpu_linear), so the crop floor takes the fp32 peak."""
    from ovis2.configuration import config_for_size
    from ovis2.cpu_linear import native_bf16_matmul

    config = config_for_size(size)
    products = "float32" if dtype == "bfloat16" and not native_bf16_matmul() else dtype
    bandwidth = copy_bandwidth(repeats=repeats)
    reads = read_bandwidth(repeats=repeats)
    gemv = gemv_bandwidth(dtype=DTYPES[dtype])
    # the other dtype once, on one shape: emulated bf16 can run at well under 1 GFLOP/s
    peaks = {
        name: matmul_peak(dtype=value) if name == products else matmul_peak(MATMUL_SHAPES[:1], 1, value)
        for name, value in DTYPES.items()
    }
    peak = peaks[products]
    weight_bytes = decode_weight_bytes(config, torch.empty(0, dtype=DTYPES[dtype]).element_size())
    flops = crop_flops(config)
    return {
        "size": size,
        "dtype": dtype,
        "products_dtype": products,
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_tflops_by_dtype": {name: p["peak_tflops"] for name, p in peaks.items()},
        "copy_bandwidth_gb_s": bandwidth,
        "read_bandwidth_gb_s": reads,
        "gemv_bandwidth_gb_s": gemv,
        "matmul": peak,
        "decode_weight_bytes": weight_bytes,
        "batch1_step_floor_ms": weight_bytes / (bandwidth * 1e9) * 1e3,
        "batch1_step_floor_read_ms": weight_bytes / (reads * 1e9) * 1e3,
        "batch1_step_floor_gemv_ms": weight_bytes / (gemv * 1e9) * 1e3,
        "crop_tflop": flops / 1e12,
        "crop_floor_ms": flops / (peak["peak_tflops"] * 1e12) * 1e3,
        "crop_floor_other_dtype_ms": {
            name: flops / (p["peak_tflops"] * 1e12) * 1e3 for name, p in peaks.items()
        },
    }


def engine_figures(model: str, output_tokens: int = 48, dtype: str = "bfloat16") -> dict:
    """Our engine decoding one text request alone: the median time of its decode steps (prefill excluded), and
    its vision tower's time per 448x448 crop (two crops a call, as bench_engine_step measures it)."""
    from ovis2.engine.engine_args import EngineArgs
    from ovis2.engine.input_processor import load_processor
    from ovis2.engine.llm_engine import LLMEngine
    from ovis2.engine.sampling_params import SamplingParams

    from .bench_engine_step import crop_seconds

    args = EngineArgs(model=model, dtype=dtype, device="cpu", max_num_seqs=1, kv_cache_memory=256 << 20)
    engine = LLMEngine(args)
    processor = load_processor(args)
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Describe a river at dawn in some detail."}]}
    ]
    inputs = processor.prepare_chat(chat)
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
    steps = []
    for attempt in range(2):  # the first request warms up
        engine.add_request(f"floor-{attempt}", inputs, params)
        times = []
        while engine.has_unfinished_requests:
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        steps = times[1:]  # times[0] is the prefill
    return {
        "decode_steps": len(steps),
        "median_step_ms": statistics.median(steps) * 1e3,
        "min_step_ms": min(steps) * 1e3,
        "crop_s": min(crop_seconds(engine.core.runner.model) for _ in range(2)),
    }


def format_floors(result: dict) -> str:
    lines = [
        f"machine floors ({result['torch_threads']} torch threads), Ovis2-{result['size']} shapes, {result['dtype']}:",
        f"  copy bandwidth           {result['copy_bandwidth_gb_s']:8.1f} GB/s (read + write)",
        f"  read bandwidth           {result['read_bandwidth_gb_s']:8.1f} GB/s (a sum over 512 MiB)",
        f"  GEMV bandwidth           {result['gemv_bandwidth_gb_s']:8.1f} GB/s (weight bytes read)",
        "  matmul peak              "
        + ", ".join(
            f"{name} {value * 1e3:.0f}" for name, value in result["matmul_peak_tflops_by_dtype"].items()
        )
        + " GFLOP/s",
        f"  batch-1 step floor       {result['batch1_step_floor_ms']:8.1f} ms "
        f"({result['decode_weight_bytes'] / 1e9:.2f} GB / copy bandwidth; "
        f"{result['batch1_step_floor_read_ms']:.1f} ms at the read bandwidth, "
        f"{result['batch1_step_floor_gemv_ms']:.1f} ms at the GEMV bandwidth)",
        f"  448x448 crop floor       {result['crop_floor_ms']:8.0f} ms ({result['crop_tflop']:.2f} TFLOP / {result.get('products_dtype', result['dtype'])} matmul peak)",
    ]
    if "engine" in result:
        engine = result["engine"]
        lines.append(
            f"  ours, engine batch-1 step {engine['median_step_ms']:7.1f} ms median "
            f"({engine['median_step_ms'] / result['batch1_step_floor_ms']:.2f}x the floor)"
        )
        lines.append(
            f"  ours, a 448x448 crop     {engine['crop_s'] * 1e3:8.0f} ms "
            f"({engine['crop_s'] * 1e3 / result['crop_floor_ms']:.2f}x the floor)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.machine_floor", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", default="1B", choices=("1B", "2B", "4B", "8B", "16B", "34B"))
    parser.add_argument(
        "--model", help="an -hf checkpoint of these shapes: also measure our engine's batch-1 step and a crop"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-json", help="write the figures here too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = floors(args.size, args.dtype)
    if args.model:
        result["engine"] = engine_figures(args.model, dtype=args.dtype)
    print(format_floors(result))
    if args.output_json:
        from pathlib import Path

        from .report import write_json

        write_json(result, Path(args.output_json))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
