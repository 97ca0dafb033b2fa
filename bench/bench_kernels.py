"""The compiled pointwise and decode-attention kernels against the PyTorch ops they replace, in one process.

    .venv/bin/python -m bench.bench_kernels --model <-hf checkpoint> [--batches 1,16] [--rounds 3]

Each measurement runs with the kernel and with PyTorch's ops, alternating (`--rounds` times; the best and the
median kept), so a busy machine slows both alike: the decode step (median over `--output-tokens` steps of
`batch` text requests) with and without the decode-attention kernel (ovis2.decode_attention), and a 448x448
crop (two crops per call, per crop) with and without the pointwise kernels (ovis2.fused_pointwise). bf16 on a CPU
with AVX512-BF16 and a C compiler; elsewhere the kernels do not load and there is nothing to compare.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from contextlib import contextmanager

import torch

from ovis2 import decode_attention, fused_pointwise

from .bench_engine_step import crop_seconds, decode_step_ms, warm_engine


@contextmanager
def kernel_off(module, enabled: bool):
    """`module.kernel_library()` answers None while enabled: its callers take the PyTorch path."""
    found = module.kernel_library
    if enabled:
        module.kernel_library = lambda: None
    try:
        yield
    finally:
        module.kernel_library = found


def alternate(module, measure, rounds: int) -> dict[str, list[float]]:
    """{"kernel": [...], "pytorch": [...]}: `measure()` `rounds` times each way, taking turns."""
    results = {"kernel": [], "pytorch": []}
    for _ in range(rounds):
        for name, off in (("kernel", False), ("pytorch", True)):
            with kernel_off(module, off):
                results[name].append(measure())
    return results


def report(label: str, results: dict[str, list[float]], unit: str) -> str:
    best = {name: min(values) for name, values in results.items()}
    median = {name: statistics.median(values) for name, values in results.items()}
    return (
        f"{label}: kernel {best['kernel']:.3g} {unit} (median {median['kernel']:.3g}), PyTorch {best['pytorch']:.3g}"
        f" {unit} (median {median['pytorch']:.3g}); PyTorch/kernel {best['pytorch'] / best['kernel']:.2f}x best,"
        f" {median['pytorch'] / median['kernel']:.2f}x median"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--output-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-crop", action="store_true")
    args = parser.parse_args(argv)
    if fused_pointwise.kernel_library() is None or decode_attention.kernel_library() is None:
        print("the kernels do not load here (they need AVX512-BF16 and a C compiler): nothing to compare")
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    engine = warm_engine(args.model, "bfloat16", max(batches))
    print(f"bf16, {torch.get_num_threads()} threads; {args.rounds} alternating rounds")
    seeds = itertools.count(1)
    for batch in batches:
        results = alternate(
            decode_attention,
            lambda batch=batch: decode_step_ms(engine, batch, args.output_tokens, next(seeds)),
            args.rounds,
        )
        print(report(f"decode step, batch {batch:3d} (decode attention)", results, "ms"))
    if not args.no_crop:
        model = engine.core.runner.model
        results = alternate(fused_pointwise, lambda: crop_seconds(model), args.rounds)
        print(report("448x448 crop (pointwise kernels)", results, "s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
