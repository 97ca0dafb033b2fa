"""Ovis2ImageProcessor (PIL): both behaviours, input modes, overrides, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovis2.errors import Ovis2Error
from ovis2.image_processing import (
    Ovis2ImageProcessor,
    best_covering_grid,
    candidate_grids,
    letterbox_size,
)
from tests.processing_helpers import (
    PHOTO_NAMES,
    bands,
    float32_rounding,
    noise,
    normalized_color,
    original_ovis_preprocess,
    photo,
    synthetic_extremes,
    transformers_image_processor,
    transparent_rgba,
)

RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture(scope="module")
def reference():
    return transformers_image_processor()


# ---------------------------------------------------------------- compat="transformers"


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_transformers_compat_matches_transformers_on_photos(reference, name):
    _assert_matches_transformers(reference, photo(name))


def test_transformers_compat_matches_transformers_on_resized_photos(reference):
    for size in [(1920, 1080), (300, 1000), (97, 61)]:
        _assert_matches_transformers(reference, photo("astronaut").resize(size))


@pytest.mark.parametrize("index", range(len(synthetic_extremes())))
def test_transformers_compat_matches_transformers_on_extremes(reference, index):
    _assert_matches_transformers(reference, synthetic_extremes()[index])


def _assert_matches_transformers(reference, image):
    expected = reference(image, return_tensors="pt")
    ours = Ovis2ImageProcessor(compat="transformers")(image)
    assert ours["grids"].tolist() == expected["grids"].tolist()
    assert ours["pixel_values"].shape == expected["pixel_values"].shape
    difference = (ours["pixel_values"] - expected["pixel_values"]).abs().max().item()
    assert difference <= float32_rounding(expected["pixel_values"])


def test_transformers_compat_reproduces_the_transposed_grid():
    wide = bands(1344, 448, RGB)
    result = Ovis2ImageProcessor(compat="transformers")(wide)
    assert result["grids"].tolist() == [[3, 1]]
    for tile in result["pixel_values"][1:]:  # each tile holds the whole width, squashed: all three colours
        for column, color in zip((20, 224, 428), RGB, strict=True):
            expected = normalized_color(color)
            assert np.abs(tile[:, 224, column].numpy() - expected).max() <= float32_rounding(expected)


def test_transformers_compat_caps_at_twelve_and_ignores_min_patches():
    processor = Ovis2ImageProcessor(compat="transformers")
    assert processor.resolve_patches() == (12, 1)
    tiny = Image.new("RGB", (64, 64))
    assert processor(tiny, min_patches=4)["grids"].tolist() == [[1, 1]]  # as transformers: no effect


# ---------------------------------------------------------------- compat="ovis"


@pytest.mark.parametrize(
    "image",
    [
        photo("astronaut"),
        photo("coffee"),
        photo("rocket").resize((1920, 1080)),
        bands(448, 1344, RGB),
        noise(5, 900),
    ],
    ids=["astronaut", "coffee", "1080p", "tall", "5x900"],
)
def test_ovis_compat_matches_the_original_algorithm(image):
    expected, expected_grid = original_ovis_preprocess(image)
    result = Ovis2ImageProcessor()(image)
    assert result["grids"].tolist() == [list(expected_grid)]
    assert np.abs(result["pixel_values"].numpy() - expected).max() <= float32_rounding(expected)


def test_ovis_compat_lays_out_a_wide_image_as_one_row():
    result = Ovis2ImageProcessor()(bands(1344, 448, RGB))
    assert result["grids"].tolist() == [[1, 3]]
    assert result["pixel_values"].shape == (4, 3, 448, 448)
    for tile, color in zip(result["pixel_values"][1:], RGB, strict=True):
        assert _max_difference(tile, normalized_color(color)) <= float32_rounding(normalized_color(color))


def test_ovis_compat_lays_out_a_tall_image_as_one_column():
    result = Ovis2ImageProcessor()(bands(448, 1344, RGB, vertical=False))
    assert result["grids"].tolist() == [[3, 1]]
    for tile, color in zip(result["pixel_values"][1:], RGB, strict=True):
        assert _max_difference(tile, normalized_color(color)) <= float32_rounding(normalized_color(color))


def test_ovis_compat_letterboxes_with_zeros():
    result = Ovis2ImageProcessor(max_patches=1)(Image.new("RGB", (896, 448), (255, 255, 255)))
    pixels = result["pixel_values"][0]
    assert letterbox_size(896, 448) == (448, 224)
    assert pixels[:, :112].abs().max() == 0 and pixels[:, 336:].abs().max() == 0
    white = normalized_color((255, 255, 255))
    assert _max_difference(pixels[:, 112:336], white) <= float32_rounding(white)


def test_ovis_compat_defaults_to_nine_tiles_and_obeys_overrides():
    processor = Ovis2ImageProcessor()
    big = Image.new("RGB", (448 * 4, 448 * 3))
    rows, cols = processor(big)["grids"][0].tolist()
    assert rows * cols <= 9 and (rows, cols) != (3, 4)
    assert processor(big, max_patches=12)["grids"].tolist() == [[3, 4]]
    assert Ovis2ImageProcessor(max_patches=12)(big)["grids"].tolist() == [[3, 4]]
    thumb = processor(big, max_patches=1)
    assert thumb["grids"].tolist() == [[1, 1]] and thumb["pixel_values"].shape[0] == 1
    assert processor(Image.new("RGB", (64, 64)), min_patches=2)["grids"].tolist() in ([[1, 2]], [[2, 1]])


def test_ovis_compat_converts_transparency_with_convert_rgb():
    ovis = Ovis2ImageProcessor(max_patches=1)(transparent_rgba())["pixel_values"][0]
    hf = Ovis2ImageProcessor(compat="transformers", max_patches=1)(transparent_rgba())["pixel_values"][0]
    red, white = normalized_color((255, 0, 0)), normalized_color((255, 255, 255))
    assert _max_difference(ovis[:, 224, 100], red) <= float32_rounding(red)  # alpha dropped: still red
    assert _max_difference(hf[:, 224, 50], white) <= float32_rounding(white)  # composited on white


# ---------------------------------------------------------------- grid choice


def test_candidate_grids_are_ordered_by_tile_count():
    grids = candidate_grids(9)
    assert grids[0] == (1, 1) and len(grids) == 23
    assert [r * c for r, c in grids] == sorted(r * c for r, c in grids)


def test_grid_for_size_needs_no_pixels_and_agrees_with_preprocess():
    processor = Ovis2ImageProcessor()
    for size in [(640, 480), (1920, 1080), (1, 4000), (448, 448)]:
        assert list(processor.grid_for_size(*size)) == processor(Image.new("RGB", size))["grids"][0].tolist()
    assert best_covering_grid(100000, 1, 9) == (1, 9)


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("compat", ["ovis", "transformers"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "I;16", "I", "F", "1", "La"])
def test_every_mode_is_accepted(compat, mode):
    image = (
        noise(200, 120).convert("RGBA").convert(mode) if mode not in ("La",) else Image.new(mode, (200, 120))
    )
    result = Ovis2ImageProcessor(compat=compat)(image)
    assert result["pixel_values"].shape[1:] == (3, 448, 448)
    assert torch.isfinite(result["pixel_values"]).all()


def test_palette_transparency_follows_the_behaviour():
    palette = synthetic_extremes()[-1]  # index 0 (black) is transparent
    ovis = Ovis2ImageProcessor(max_patches=1)(palette)["pixel_values"][0]
    hf = Ovis2ImageProcessor(compat="transformers", max_patches=1)(palette)["pixel_values"][0]
    black, white = normalized_color((0, 0, 0)), normalized_color((255, 255, 255))
    assert _max_difference(ovis[:, 224, 224], black) <= float32_rounding(black)
    assert _max_difference(hf[:, 224, 224], white) <= float32_rounding(white)


def test_arrays_and_tensors_are_accepted():
    rgb = np.array(photo("chelsea"))
    expected = Ovis2ImageProcessor()(photo("chelsea"))["pixel_values"]
    for image in [
        rgb,
        torch.from_numpy(rgb).permute(2, 0, 1),
        rgb.astype(np.float32) / 255,
        torch.from_numpy(rgb),
    ]:
        assert torch.equal(Ovis2ImageProcessor()(image)["pixel_values"], expected)  # the same uint8 pixels
    for image in [rgb[..., 0], np.zeros((5, 7, 4), np.uint8), np.ones((3, 9, 9), bool)]:
        assert Ovis2ImageProcessor()(image)["pixel_values"].shape[1:] == (3, 448, 448)


def test_very_large_and_extreme_images():
    processor = Ovis2ImageProcessor()
    assert processor(Image.new("RGB", (8000, 6000)))["grids"].tolist() == [[3, 3]]
    assert processor(Image.new("RGB", (1, 4000)))["pixel_values"].shape == (10, 3, 448, 448)
    assert processor(Image.new("RGB", (1, 1)))["pixel_values"].shape == (1, 3, 448, 448)


def test_several_images_concatenate_crops():
    result = Ovis2ImageProcessor()([photo("astronaut"), photo("chelsea")])
    assert result["grids"].tolist() == [[2, 2], [1, 1]]
    assert result["pixel_values"].shape == (6, 3, 448, 448) and result["pixel_values"].dtype == torch.float32
    assert Ovis2ImageProcessor()([photo("chelsea")], return_tensors="np")["pixel_values"].shape == (
        1,
        3,
        448,
        448,
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: Ovis2ImageProcessor(compat="other"),
        lambda: Ovis2ImageProcessor(max_patches=0),
        lambda: Ovis2ImageProcessor()(Image.new("RGB", (8, 8)), max_patches=1000),
        lambda: Ovis2ImageProcessor()(Image.new("RGB", (0, 0))),
        lambda: Ovis2ImageProcessor()("not an image"),
        lambda: Ovis2ImageProcessor()(np.zeros((5, 5, 2), np.uint8)),
        lambda: Ovis2ImageProcessor()([]),
    ],
)
def test_user_mistakes_raise_ovis2_error(call):
    with pytest.raises(Ovis2Error):
        call()


# ---------------------------------------------------------------- configs


def test_from_pretrained_reads_hf_config_but_ovis_keeps_nine(tmp_path):
    Ovis2ImageProcessor().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["max_patches"] == 12 and config["size"] == {"height": 448, "width": 448}
    assert Ovis2ImageProcessor.from_pretrained(tmp_path).resolve_patches() == (9, 1)
    assert Ovis2ImageProcessor.from_pretrained(tmp_path, compat="transformers").resolve_patches() == (12, 1)
    assert Ovis2ImageProcessor.from_pretrained(tmp_path, max_patches=4).resolve_patches() == (4, 1)
    config["max_patches"] = 6
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert Ovis2ImageProcessor.from_pretrained(tmp_path, compat="transformers").resolve_patches() == (6, 1)


def test_from_pretrained_original_checkpoint_gets_original_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ovis"}))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"max_patches": 12, "crop_to_patches": False})
    )
    assert Ovis2ImageProcessor.from_pretrained(tmp_path).resolve_patches() == (9, 1)


def test_from_pretrained_unknown_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Ovis2Error, match="neither a checkpoint directory"):
        Ovis2ImageProcessor.from_pretrained(str(tmp_path / "missing"))


def _max_difference(pixels, color: np.ndarray) -> float:
    """Largest |pixel - color| over a [3] pixel or a [3, h, w] region, per channel."""
    values = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    shape = (3,) + (1,) * (values.ndim - 1)
    return float(np.abs(values - color.reshape(shape)).max())
