"""The CPU linear dispatch (ovis2.cpu_linear) against plain F.linear on the Ovis2-1B shapes, rows 1 to 1024.

    .venv/bin/python -m bench.bench_cpu_linear [--dtype float32|bfloat16] [--threads 2] [--repeats 3] [--packed]

Each shape is run over enough copies of its weight (>= 256 MB) that no product finds its weight in cache, as
in a real step. F.linear and the dispatch alternate, best of `--repeats`; the ratio is F.linear's time over the
dispatch's (> 1: the dispatch is faster). `--packed`: the dispatch column is a `Linear` whose weight was packed
once for oneDNN (`Linear.pack`, what the engine does for bf16 on a CPU that computes bf16 itself). LLM shapes:
Qwen2.5-0.5B's q/k/v/o, gate/up, down and the 151936-word projection; vision shapes: AIMv2-large's qkv, fc1/fc2
at the 1024 patches of one crop.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ovis2.cpu_linear import Linear, linear

from .machine_floor import best_seconds

SHAPES = {  # name: (out features, in features, row counts)
    "llm q/o 896x896": (896, 896, (1, 4, 8, 16, 32, 64)),
    "llm k/v 128x896": (128, 896, (1, 16)),
    "llm gate/up 4864x896": (4864, 896, (1, 2, 4, 8, 12, 16, 32, 64, 256)),
    "llm down 896x4864": (896, 4864, (1, 16, 64)),
    "vocabulary 151936x896": (151936, 896, (1, 4, 16)),
    "vision qkv 1024x1024": (1024, 1024, (1024,)),
    "vision fc1 2816x1024": (2816, 1024, (1024,)),
    "vision fc2 1024x2816": (1024, 2816, (1024,)),
}
MIN_BYTES = 256 << 20


def measure(out_features, in_features, rows, dtype, repeats, packed=False) -> tuple[float, float]:
    weight_bytes = out_features * in_features * torch.finfo(dtype).bits // 8
    copies = max(1, -(-MIN_BYTES // weight_bytes))
    if rows >= 256:
        copies = min(copies, 4)  # compute-bound: cache misses do not matter, time does
    weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(copies)]
    x = torch.randn(rows, in_features).to(dtype)
    plain = best_seconds(lambda: [F.linear(x, w) for w in weights], repeats)
    if packed:
        modules = [_packed_module(w) for w in weights]
        dispatched = best_seconds(lambda: [m(x) for m in modules], repeats)
    else:
        dispatched = best_seconds(lambda: [linear(x, w) for w in weights], repeats)
    return plain / copies, dispatched / copies


def _packed_module(weight: torch.Tensor) -> Linear:
    module = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    if not module.pack():
        raise SystemExit(f"oneDNN cannot pack {weight.dtype} weights here")
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--packed", action="store_true", help="time packed Linear modules as the dispatch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    label = "packed" if args.packed else "dispatch"
    print(f"{args.dtype}, {args.threads} threads; ms per product, F.linear / {label}")
    for name, (out_features, in_features, row_counts) in SHAPES.items():
        for rows in row_counts:
            plain, dispatched = measure(out_features, in_features, rows, dtype, args.repeats, args.packed)
            print(
                f"{name:24s} rows {rows:5d}  F.linear {plain * 1e3:8.2f}  dispatch {dispatched * 1e3:8.2f}"
                f"  ratio {plain / dispatched:5.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
