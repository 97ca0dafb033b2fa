"""Ovis2ImageProcessor: images -> 448x448 crops (thumbnail first) and a (rows, cols) grid, with PIL + numpy.

Two behaviours share the grid choice (`best_covering_grid`) and differ in how crops are cut:

- `compat="ovis"` (default, what the weights were trained on): crops are cut from the native-resolution
  image in (rows, cols) order, each resized keeping its aspect ratio (long side 448) and letterboxed with
  zeros after normalisation; at most 9 tiles; images are converted with `convert("RGB")`.
- `compat="transformers"`: reproduces transformers' Ovis2 image processor, transposed grid of non-square
  images, stretched (not letterboxed) crops, a cap of 12 tiles and transparency composited on white.

Both backends (this one and `Ovis2ImageProcessorFast`) execute the same `CropPlan`, which depends only on
the image size, so the grid (and the token cost) of an image is known without decoding it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .checkpoint import resolve_checkpoint
from .compat import check_compat
from .configuration import read_json_object
from .errors import Ovis2Error
from .image_layout import MAX_TILES_PER_IMAGE as MAX_ALLOWED_PATCHES

CROP_SIDE = 448
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ORIGINAL_MAX_PATCHES = 9  # the original `max_partition`
HF_MAX_PATCHES = 12  # transformers' class default, kept by the -hf preprocessor configs
COVERING_THRESHOLD = 0.9
PREPROCESSOR_CONFIG = "preprocessor_config.json"

Box = tuple[int, int, int, int]  # left, upper, right, lower


# ---------------------------------------------------------------- grid choice (no pixels needed)


@lru_cache(maxsize=64)
def candidate_grids(max_patches: int, min_patches: int = 1) -> tuple[tuple[int, int], ...]:
    """(rows, cols) candidates with min <= rows*cols <= max, ordered by tile count (stable)."""
    grids = [
        (rows, cols)
        for rows in range(1, max_patches + 1)
        for cols in range(1, max_patches + 1)
        if min_patches <= rows * cols <= max_patches
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def split_regions(width: int, height: int, grid: tuple[int, int]) -> list[Box]:
    """Row-major regions of a rows x cols split; the last row and column take the remainder."""
    rows, cols = grid
    row_height, col_width = height // rows, width // cols
    return [
        (
            col * col_width,
            row * row_height,
            width if col == cols - 1 else (col + 1) * col_width,
            height if row == rows - 1 else (row + 1) * row_height,
        )
        for row in range(rows)
        for col in range(cols)
    ]


def covered_area(box: Box, side: int) -> float:
    """Area of a region after its long side is capped at `side` (what a crop keeps of it)."""
    left, upper, right, lower = box
    long, short = max(right - left, lower - upper), min(right - left, lower - upper)
    if long > side:
        short, long = short / long * side, side
    return long * short


def covering_ratio(width: int, height: int, grid: tuple[int, int], side: int = CROP_SIDE) -> float:
    return sum(covered_area(box, side) for box in split_regions(width, height, grid)) / (width * height)


@lru_cache(maxsize=4096)
def best_covering_grid(
    width: int, height: int, max_patches: int, min_patches: int = 1, side: int = CROP_SIDE
) -> tuple[int, int]:
    """The fewest tiles covering > 90% of the image (tie: more covering), else the best covering."""
    scored = [
        (grid, covering_ratio(width, height, grid, side))
        for grid in candidate_grids(max_patches, min_patches)
    ]
    good = [item for item in scored if item[1] > COVERING_THRESHOLD]
    if good:
        return min(good, key=lambda item: (item[0][0] * item[0][1], -item[1]))[0]
    return min(scored, key=lambda item: (-item[1], item[0][0] * item[0][1]))[0]


def letterbox_size(width: int, height: int, side: int = CROP_SIDE) -> tuple[int, int]:
    """(width, height) with the long side at `side`, the short side truncated (never below 1 pixel)."""
    if width == height:
        return side, side
    if width > height:
        return side, max(1, int(height / width * side))
    return max(1, int(width / height * side)), side


# ---------------------------------------------------------------- crop plans


@dataclass(frozen=True)
class Crop:
    box: Box  # region of the source (the image, or the stretched canvas when `on_canvas`)
    size: tuple[int, int]  # (width, height) the region is resized to
    offset: tuple[int, int]  # (x, y) where it lands in the side x side square
    on_canvas: bool = False


@dataclass(frozen=True)
class CropPlan:
    grid: tuple[int, int]  # (rows, cols) as the model sees it
    crops: tuple[Crop, ...]  # thumbnail first when there is more than one
    canvas: tuple[int, int] | None = None  # transformers: (width, height) the whole image is stretched to


def _letterboxed_crop(box: Box, side: int) -> Crop:
    width, height = box[2] - box[0], box[3] - box[1]
    new_width, new_height = letterbox_size(width, height, side)
    return Crop(box, (new_width, new_height), ((side - new_width) // 2, (side - new_height) // 2))


@lru_cache(maxsize=4096)
def ovis_crop_plan(width: int, height: int, max_patches: int, min_patches: int, side: int) -> CropPlan:
    """The original algorithm: native-resolution regions, letterboxed, thumbnail first."""
    grid = best_covering_grid(width, height, max_patches, min_patches, side)
    crops = [_letterboxed_crop(box, side) for box in split_regions(width, height, grid)]
    if len(crops) > 1:
        crops.insert(0, _letterboxed_crop((0, 0, width, height), side))
    return CropPlan(grid, tuple(crops))


@lru_cache(maxsize=4096)
def transformers_crop_plan(width: int, height: int, max_patches: int, side: int) -> CropPlan:
    """transformers' behaviour: the covering grid read as (cols, rows), the image stretched and sliced."""
    whole = Crop((0, 0, width, height), (side, side), (0, 0))
    if max_patches <= 1:
        return CropPlan((1, 1), (whole,))
    cols, rows = best_covering_grid(width, height, max_patches, 1, side)  # the transposition, on purpose
    if rows * cols == 1:
        return CropPlan((1, 1), (whole,))
    tiles = [
        Crop(
            (col * side, row * side, (col + 1) * side, (row + 1) * side), (side, side), (0, 0), on_canvas=True
        )
        for row in range(rows)
        for col in range(cols)
    ]
    return CropPlan((rows, cols), (whole, *tiles), canvas=(cols * side, rows * side))


# ---------------------------------------------------------------- decoding inputs


def to_pil_image(image) -> Image.Image:
    """A PIL image from a PIL image, a numpy array or a torch tensor (HWC, HW or CHW; uint8 or [0, 1] floats)."""
    if isinstance(image, Image.Image):
        return image
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise Ovis2Error(
            f"an image array must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}"
        )
    return Image.fromarray(_to_uint8(array))


def _to_numpy(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    if type(image).__module__.startswith("torch"):
        return image.detach().cpu().numpy()
    raise Ovis2Error(
        f"an image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}"
    )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0 and array.max() <= 1:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, compat: str) -> Image.Image:
    """The one RGB conversion an image gets (callers, the server included, hand images over in their own mode).

    - ovis: `image.convert("RGB")` when the mode is not RGB, as the original does (AIDC-AI/Ovis,
      ovis/model/visual_tokenizer/base_visual_tokenizer.py, `preprocess_image(..., convert_to_rgb=True)`, before
      the grid is chosen): alpha and palette transparency are dropped, the colour under them stays.
    - transformers: as `transformers.image_transforms.convert_to_rgb`, which its Ovis2 image processors apply to
      PIL images: an image with an alpha band or a `transparency` entry is composited on white, any other is
      converted with `convert("RGB")`.
    """
    if image.width < 1 or image.height < 1:
        raise Ovis2Error(f"an image must have at least one pixel, got {image.width}x{image.height}")
    if image.mode == "RGB":
        return image
    if compat == "transformers" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError):  # modes PIL cannot convert (e.g. "La"): keep the first band as grey
        return image.getchannel(0).convert("L").convert("RGB")


# ---------------------------------------------------------------- normalisation


def normalization_table(mean, std) -> np.ndarray:
    """[3, 256] float32: uint8 value -> (value / 255 - mean) / std, computed as transformers does."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((scaled[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


def paste_normalized(
    square: np.ndarray, table: np.ndarray, pixels: np.ndarray, offset: tuple[int, int]
) -> None:
    """Writes uint8 HWC `pixels`, normalised through `table`, into `square` [3, s, s]; zeros around them."""
    x, y = offset
    height, width = pixels.shape[:2]
    if (height, width) != square.shape[1:]:
        square.fill(0)
    for channel in range(3):
        np.take(
            table[channel],
            pixels[..., channel],
            out=square[channel, y : y + height, x : x + width],
            mode="clip",
        )


# ---------------------------------------------------------------- the processor


class Ovis2ImageProcessor:
    """PIL + numpy backend. `__call__(images)` -> BatchFeature(pixel_values [crops, 3, 448, 448], grids [n, 2])."""

    backend = "pil"

    def __init__(
        self,
        compat: str = "ovis",
        max_patches: int | None = None,
        min_patches: int = 1,
        crop_to_patches: bool = True,
        size: int | dict = CROP_SIDE,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        config_max_patches: int | None = None,
    ):
        self.compat = check_compat(compat)
        self.max_patches = max_patches  # explicit: overrides the compat default
        self.config_max_patches = config_max_patches  # from a -hf config: used by compat="transformers" only
        self.min_patches = min_patches
        self.crop_to_patches = crop_to_patches
        self.side = int(size["height"] if isinstance(size, dict) else size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._table = normalization_table(self.image_mean, self.image_std)
        self.resolve_patches()  # validates the defaults

    # -- configuration

    @classmethod
    def from_pretrained(cls, path_or_hub_id, compat: str = "ovis", **overrides):
        """Reads a -hf `preprocessor_config.json`; an original AIDC checkpoint gets the original defaults."""
        folder = resolve_checkpoint(path_or_hub_id)
        return cls(compat=compat, **{**image_processor_kwargs(folder), **overrides})

    def to_dict(self) -> dict:
        max_patches = self.max_patches or (self.config_max_patches or HF_MAX_PATCHES)
        return {
            "image_processor_type": "Ovis2ImageProcessor",
            "processor_class": "Ovis2Processor",
            "crop_to_patches": self.crop_to_patches,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "max_patches": max_patches,
            "min_patches": self.min_patches,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": self.side, "width": self.side},
            "use_covering_area_grid": True,
        }

    def save_pretrained(self, folder) -> Path:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        (path / PREPROCESSOR_CONFIG).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path / PREPROCESSOR_CONFIG

    # -- grid and plan (no pixels)

    def resolve_patches(
        self, max_patches: int | None = None, min_patches: int | None = None
    ) -> tuple[int, int]:
        """The effective (max_patches, min_patches) of a call: call > constructor > compat default."""
        max_patches = max_patches if max_patches is not None else self.max_patches
        if max_patches is None:
            default = (self.config_max_patches or HF_MAX_PATCHES) if self.compat == "transformers" else None
            max_patches = default or ORIGINAL_MAX_PATCHES
        if not self.crop_to_patches:
            max_patches = 1
        min_patches = min_patches if min_patches is not None else self.min_patches
        _check_patches(max_patches, min_patches)
        return int(max_patches), min(int(min_patches), int(max_patches))

    def crop_plan(
        self, width: int, height: int, max_patches: int | None = None, min_patches: int | None = None
    ):
        max_patches, min_patches = self.resolve_patches(max_patches, min_patches)
        if width < 1 or height < 1:
            raise Ovis2Error(f"an image must have at least one pixel, got {width}x{height}")
        if self.compat == "transformers":
            return transformers_crop_plan(int(width), int(height), max_patches, self.side)
        return ovis_crop_plan(int(width), int(height), max_patches, min_patches, self.side)

    def grid_for_size(self, width: int, height: int, max_patches: int | None = None, min_patches=None):
        """(rows, cols) the chosen behaviour gives an image of this size."""
        return self.crop_plan(width, height, max_patches, min_patches).grid

    # -- pixels

    def prepare_image(self, image) -> Image.Image:
        """Any accepted input -> the RGB PIL image this behaviour crops."""
        return to_rgb(to_pil_image(image), self.compat)

    def preprocess_image(self, image, max_patches: int | None = None, min_patches: int | None = None):
        """One image -> (pixel_values float32 [crops, 3, side, side], grid (rows, cols))."""
        rgb = self.prepare_image(image)
        plan = self.crop_plan(rgb.width, rgb.height, max_patches, min_patches)
        return self._run_plan(rgb, plan), plan.grid

    def _run_plan(self, rgb: Image.Image, plan: CropPlan):
        canvas = rgb.resize(plan.canvas, Image.Resampling.BICUBIC) if plan.canvas else None
        out = np.empty((len(plan.crops), 3, self.side, self.side), dtype=np.float32)
        for index, crop in enumerate(plan.crops):
            pixels = _resized_region(canvas if crop.on_canvas else rgb, crop)
            paste_normalized(out[index], self._table, pixels, crop.offset)
        return out

    def __call__(self, images, return_tensors: str | None = "pt", max_patches=None, min_patches=None):
        return self.preprocess(
            images, return_tensors=return_tensors, max_patches=max_patches, min_patches=min_patches
        )

    def preprocess(self, images, return_tensors: str | None = "pt", max_patches=None, min_patches=None):
        results = [self.preprocess_image(image, max_patches, min_patches) for image in flatten_images(images)]
        return make_batch_feature(results, return_tensors)


def _resized_region(source: Image.Image, crop: Crop) -> np.ndarray:
    region = source if crop.box == (0, 0, *source.size) else source.crop(crop.box)
    if region.size != crop.size:
        region = region.resize(crop.size, Image.Resampling.BICUBIC)
    return np.asarray(region)


def _check_patches(max_patches, min_patches) -> None:
    for name, value in (("max_patches", max_patches), ("min_patches", min_patches)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise Ovis2Error(f"{name} must be a positive integer, got {value!r}")
    if max_patches > MAX_ALLOWED_PATCHES:
        raise Ovis2Error(f"max_patches must be at most {MAX_ALLOWED_PATCHES}, got {max_patches}")


def flatten_images(images) -> list:
    """A single image, a list of images, or a list of lists (one per prompt) -> a flat list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    return [images]


def make_batch_feature(results, return_tensors: str | None):
    """[(pixel_values, grid)] -> BatchFeature with `pixel_values` [crops, 3, s, s] and `grids` [n, 2]."""
    import torch
    from transformers import BatchFeature

    if not results:
        raise Ovis2Error("no images were given")
    arrays = [pixels for pixels, _ in results]
    grids = [list(grid) for _, grid in results]
    if return_tensors == "pt":
        pixel_values = (
            torch.cat([torch.as_tensor(a) for a in arrays]) if len(arrays) > 1 else torch.as_tensor(arrays[0])
        )
        return BatchFeature({"pixel_values": pixel_values, "grids": torch.tensor(grids, dtype=torch.long)})
    if return_tensors == "np":
        pixel_values = np.concatenate([np.asarray(a) for a in arrays])
        return BatchFeature({"pixel_values": pixel_values, "grids": np.asarray(grids, dtype=np.int64)})
    if return_tensors is None:
        return BatchFeature(
            {"pixel_values": [crop for a in arrays for crop in np.asarray(a)], "grids": grids}
        )
    raise Ovis2Error(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")


# ---------------------------------------------------------------- reading checkpoints


def read_json(path: Path) -> dict:
    """A checkpoint's JSON object file, {} where it is missing."""
    return read_json_object(path) if path.is_file() else {}


def is_original_checkpoint(folder: Path) -> bool:
    """AIDC-AI/Ovis2-* checkpoints say model_type "ovis"; the -hf ones say "ovis2"."""
    return read_json(folder / "config.json").get("model_type") == "ovis"


def image_processor_kwargs(folder: Path) -> dict:
    """Constructor arguments from a -hf preprocessor config; none (the defaults) for an original checkpoint."""
    if is_original_checkpoint(folder):
        return {}
    config = read_json(folder / PREPROCESSOR_CONFIG)
    kwargs = {
        "config_max_patches": config.get("max_patches"),
        "min_patches": config.get("min_patches", 1),
        "crop_to_patches": config.get("crop_to_patches", True),
        "image_mean": config.get("image_mean", CLIP_MEAN),
        "image_std": config.get("image_std", CLIP_STD),
    }
    size = config.get("size") or {}
    if size.get("height"):
        kwargs["size"] = int(size["height"])
    return kwargs
