"""Shared test inputs for the image processors and the processor, plus an independent original algorithm."""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
SIDE = 448
GREY_LEVEL = float(
    1 / (255 * CLIP_STD.max())
)  # the smallest step one uint8 level makes once normalised (0.0142)


def float32_rounding(values) -> float:
    """How far two correct computations of normalised pixels from the same uint8 values may differ (float64 vs
    float32, or another order of the same operations): a few float32 ulps at the values' largest magnitude, far
    below one grey level."""
    return 4 * float(np.finfo(np.float32).eps) * float(np.abs(np.asarray(values, dtype=np.float64)).max())


@cache
def photo(name: str) -> Image.Image:
    """A real photograph from scikit-image's bundled data (offline)."""
    from skimage import data

    array = getattr(data, name)()
    return Image.fromarray(array)


PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def bands(width: int, height: int, colors, vertical: bool = True) -> Image.Image:
    """Equal side-by-side (vertical=True) or stacked bands of solid colours."""
    image = Image.new("RGB", (width, height))
    count = len(colors)
    for index, color in enumerate(colors):
        if vertical:
            box = (index * width // count, 0, (index + 1) * width // count, height)
        else:
            box = (0, index * height // count, width, (index + 1) * height // count)
        image.paste(color, box)
    return image


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    shape = (height, width) if channels == 1 else (height, width, channels)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if channels == 1 else None)
    return image if image.mode == mode else image.convert(mode)


def transparent_rgba() -> Image.Image:
    """Red pixels, half of them fully transparent: ovis keeps red, transformers shows white."""
    array = np.zeros((300, 500, 4), dtype=np.uint8)
    array[..., 0] = 255
    array[:, 250:, 3] = 255
    return Image.fromarray(array, "RGBA")


def synthetic_extremes() -> list[Image.Image]:
    palette = Image.new("P", (120, 90))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    return [
        Image.new("RGB", (1, 1), (200, 10, 10)),
        noise(1, 4000),
        noise(4000, 1, seed=1),
        noise(2000, 30, seed=2),
        bands(1344, 448, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]),
        transparent_rgba(),
        noise(300, 200, "LA", seed=3),
        noise(257, 611, "L", seed=4),
        palette,
    ]


# ---------------------------------------------------------------- the original algorithm, re-derived


def original_ovis_preprocess(image: Image.Image, max_partition: int = 9):
    """AIDC Ovis2's `preprocess_image`, written from its description: (pixel_values [n, 3, 448, 448], grid)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    grid = _original_best_grid(image.size, max_partition)
    crops = [image.crop(box) for box in _original_partition(image.size, grid)]
    if len(crops) > 1:
        crops.insert(0, image)
    return np.stack([_original_letterbox(crop) for crop in crops]), grid


def _original_partition(size, grid):
    width, height = size
    row_height, col_width = height // grid[0], width // grid[1]
    boxes = []
    for row in range(grid[0]):
        for col in range(grid[1]):
            right = width if col == grid[1] - 1 else (col + 1) * col_width
            lower = height if row == grid[0] - 1 else (row + 1) * row_height
            boxes.append((col * col_width, row * row_height, right, lower))
    return boxes


def _original_covering(box) -> float:
    w, h = box[2] - box[0], box[3] - box[1]
    w, h = max(w, h), min(w, h)
    if w > SIDE:
        h, w = h / w * SIDE, SIDE
    return w * h


def _original_best_grid(size, max_partition):
    area = size[0] * size[1]
    candidates = [
        (i, j)
        for i in range(1, max_partition + 1)
        for j in range(1, max_partition + 1)
        if i * j <= max_partition
    ]
    scored = [
        (g, sum(_original_covering(b) for b in _original_partition(size, g)) / area) for g in candidates
    ]
    good = [item for item in scored if item[1] > 0.9]
    if good:
        return sorted(good, key=lambda item: (item[0][0] * item[0][1], -item[1]))[0][0]
    return sorted(scored, key=lambda item: (-item[1], item[0][0] * item[0][1]))[0][0]


def _original_letterbox(crop: Image.Image) -> np.ndarray:
    w, h = crop.size
    if w == h:
        new_w = new_h = SIDE
    elif w > h:
        new_w, new_h = SIDE, int(h / w * SIDE)
    else:
        new_w, new_h = int(w / h * SIDE), SIDE
    pixels = np.asarray(crop.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    pixels = ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    square = np.zeros((3, SIDE, SIDE))
    top, left = (SIDE - new_h) // 2, (SIDE - new_w) // 2
    square[:, top : top + new_h, left : left + new_w] = pixels
    return square


def normalized_color(rgb) -> np.ndarray:
    return (np.asarray(rgb, dtype=np.float64) / 255 - CLIP_MEAN) / CLIP_STD


def transformers_image_processor(**overrides):
    """transformers' PIL Ovis2 image processor configured as the -hf checkpoints' preprocessor config."""
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    settings = {
        "crop_to_patches": True,
        "size": {"height": SIDE, "width": SIDE},
        "max_patches": 12,
        "min_patches": 1,
    }
    return Ovis2ImageProcessorPil(**{**settings, **overrides})
