"""Image preprocessing speed, side by side in one run: ours (PIL and fast, both behaviours) vs transformers.

    .venv/bin/python bench/bench_image_processing.py [--rounds 7]

Per image, for 640x480 and 1920x1080 photographs (scikit-image's bundled photos, resized), the median over
rounds of the mean time per image. Processors run interleaved inside each round, so a busy machine slows
them alike; ratios are against transformers' `Ovis2ImageProcessorPil` configured as the -hf checkpoints.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

SIZES = ((640, 480), (1920, 1080))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photos(size: tuple[int, int]) -> list[Image.Image]:
    from skimage import data

    return [
        Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        for name in PHOTOS
    ]


def processors() -> dict:
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    from ovis2.image_processing import Ovis2ImageProcessor
    from ovis2.image_processing_fast import Ovis2ImageProcessorFast

    reference = Ovis2ImageProcessorPil(
        crop_to_patches=True, size={"height": 448, "width": 448}, max_patches=12
    )
    return {
        "transformers Ovis2ImageProcessorPil": lambda image: reference(image, return_tensors="pt"),
        "ours PIL, compat=ovis": Ovis2ImageProcessor(compat="ovis"),
        "ours PIL, compat=transformers": Ovis2ImageProcessor(compat="transformers"),
        "ours fast, compat=ovis": Ovis2ImageProcessorFast(compat="ovis"),
        "ours fast, compat=transformers": Ovis2ImageProcessorFast(compat="transformers"),
    }


def time_per_image(run, images) -> float:
    start = time.perf_counter()
    for image in images:
        run(image)
    return (time.perf_counter() - start) / len(images)


def measure(size, runs: dict, rounds: int) -> dict[str, float]:
    images = photos(size)
    for run in runs.values():  # warm-up: caches, lazy imports, kernels
        time_per_image(run, images[:1])
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(time_per_image(run, images))
    return {name: statistics.median(values) for name, values in samples.items()}


def report(size, medians: dict[str, float]) -> None:
    baseline = medians["transformers Ovis2ImageProcessorPil"]
    print(
        f"\n{size[0]}x{size[1]} ({len(PHOTOS)} photos), ms per image (median of rounds), speed-up vs transformers"
    )
    for name, seconds in medians.items():
        print(f"  {name:34s} {seconds * 1000:8.1f} ms   {baseline / seconds:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    runs = processors()
    for size in SIZES:
        report(size, measure(size, runs, args.rounds))


if __name__ == "__main__":
    main()
