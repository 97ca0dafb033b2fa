"""The one-row bf16 kernel (ovis2.packed_gemv) against oneDNN's product over the same packed weights, on the
Ovis2-1B decode shapes (q/k/v and gate/up fused as the engine runs them), in GB/s of weight read.

    .venv/bin/python -m bench.bench_one_row [--threads 2] [--rounds 3] [--rows-hint 16]

Each shape runs over enough copies of its weight (>= 512 MB) that no product finds its weight in cache, as in a
real step; the two alternate, `--rounds` times, best kept. The read bandwidth of a plain sum is printed beside
them: the most a one-row product can read.
"""

from __future__ import annotations

import argparse

import torch

from ovis2.cpu_linear import packed_product, reordered_weight
from ovis2.packed_gemv import kernel_library, one_row_product

from .machine_floor import best_seconds, read_bandwidth

SHAPES = {  # name: (out features, in features)
    "q/k/v fused 1152x896": (1152, 896),
    "o 896x896": (896, 896),
    "gate/up fused 9728x896": (9728, 896),
    "down 896x4864": (896, 4864),
    "vocabulary 151936x896": (151936, 896),
}
MIN_BYTES = 512 << 20


def measure(out_features: int, in_features: int, rounds: int, rows_hint: int) -> tuple[float, float]:
    """GB/s of (kernel, oneDNN) for one row, best of alternating rounds."""
    weight_bytes = out_features * in_features * 2
    copies = max(1, -(-MIN_BYTES // weight_bytes))
    packed, products = [], []
    for _ in range(copies):
        weight = torch.randn(out_features, in_features).to(torch.bfloat16)
        packed.append(reordered_weight(weight, rows_hint))
        products.append(one_row_product(packed[-1], weight))
    if any(product is None for product in products):
        raise SystemExit(f"the kernel cannot read the packed {out_features}x{in_features} weight here")
    x = torch.randn(1, in_features).to(torch.bfloat16)
    kernel, onednn = float("inf"), float("inf")
    for _ in range(rounds):
        kernel = min(kernel, best_seconds(lambda: [product(x, None) for product in products], 1))
        onednn = min(
            onednn, best_seconds(lambda: [packed_product(x, p, None, out_features) for p in packed], 1)
        )
    total = weight_bytes * copies / 1e9
    return total / kernel, total / onednn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows-hint", type=int, default=16, help="rows oneDNN packs for (the engine's: 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if kernel_library() is None:
        raise SystemExit(
            "no one-row kernel here (needs AVX512-BF16 and a C compiler; OVIS2_NATIVE_GEMV unset)"
        )
    print(
        f"bf16, one row, {args.threads} threads; GB/s of weight read (read bandwidth {read_bandwidth():.1f})"
    )
    for name, (out_features, in_features) in SHAPES.items():
        kernel, onednn = measure(out_features, in_features, args.rounds, args.rows_hint)
        print(f"{name:24s} kernel {kernel:6.1f}  oneDNN {onednn:6.1f}  ratio {kernel / onednn:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
