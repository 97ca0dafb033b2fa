"""Ovis2ImageProcessorFast: the same grids as the PIL processor and pixels within a stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovis2.image_processing import Ovis2ImageProcessor
from ovis2.image_processing_fast import Ovis2ImageProcessorFast, resize_uint8
from tests.processing_helpers import (
    PHOTO_NAMES,
    bands,
    float32_rounding,
    noise,
    normalized_color,
    photo,
    synthetic_extremes,
)

MEAN_TOLERANCE = 0.01  # mean |fast - PIL| in normalised units (0.01 ~ 0.7 grey levels)
MAX_TOLERANCE = 0.35  # worst pixel, seen when upscaling white noise (photos stay under 0.04, ~3 grey levels)


def _inputs():
    photos = [photo(name) for name in PHOTO_NAMES] + [photo("rocket").resize((1920, 1080))]
    return photos + synthetic_extremes()


@pytest.mark.parametrize("compat", ["ovis", "transformers"])
def test_fast_matches_pil(compat):
    pil, fast = Ovis2ImageProcessor(compat=compat), Ovis2ImageProcessorFast(compat=compat)
    for image in _inputs():
        expected, ours = pil(image), fast(image)
        assert ours["grids"].tolist() == expected["grids"].tolist()
        difference = (ours["pixel_values"] - expected["pixel_values"]).abs()
        assert difference.mean().item() <= MEAN_TOLERANCE, image.size
        assert difference.max().item() <= MAX_TOLERANCE, image.size


def test_fast_keeps_the_ovis_layout():
    result = Ovis2ImageProcessorFast()(bands(1344, 448, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]))
    assert result["grids"].tolist() == [[1, 3]]
    for tile, color in zip(result["pixel_values"][1:], [(255, 0, 0), (0, 255, 0), (0, 0, 255)], strict=True):
        expected = normalized_color(color)[:, None, None]
        assert np.abs(tile.numpy() - expected).max() <= float32_rounding(expected)


def test_fast_batches_several_images_and_overrides():
    fast = Ovis2ImageProcessorFast()
    result = fast([photo("astronaut"), photo("chelsea"), photo("coffee")], max_patches=1)
    assert result["grids"].tolist() == [[1, 1]] * 3
    assert result["pixel_values"].shape == (3, 3, 448, 448) and result["pixel_values"].dtype == torch.float32


def test_fast_accepts_arrays_tensors_and_modes():
    fast = Ovis2ImageProcessorFast()
    rgb = np.array(photo("chelsea"))
    expected = fast(photo("chelsea"))["pixel_values"]
    for image in [rgb, torch.from_numpy(rgb).permute(2, 0, 1), Image.fromarray(rgb).convert("RGBA")]:
        assert torch.equal(fast(image)["pixel_values"], expected)  # the same uint8 pixels
    for mode in ["L", "I;16", "CMYK", "P"]:
        assert fast(Image.fromarray(rgb).convert(mode))["pixel_values"].shape[1:] == (3, 448, 448)


def test_resize_uint8_keeps_size_and_range():
    pixels = torch.randint(0, 256, (1, 3, 50, 70), dtype=torch.uint8)
    assert resize_uint8(pixels, (70, 50)) is pixels
    resized = resize_uint8(pixels, (448, 320))
    assert resized.shape == (1, 3, 320, 448) and resized.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_on_cuda_matches_cpu():
    image = noise(640, 480)  # not a scikit-image photo: the lent GPU machines lack scikit-image
    cpu = Ovis2ImageProcessorFast()(image)["pixel_values"]
    cuda = Ovis2ImageProcessorFast(device="cuda")(image)["pixel_values"]
    assert cuda.device.type == "cuda"
    assert (cuda.cpu() - cpu).abs().mean().item() <= MEAN_TOLERANCE
