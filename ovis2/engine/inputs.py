"""A prompt ready for the engine: token ids with image placeholders expanded, and the images' pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOKENS_PER_CROP = 256


def image_token_count(grid: tuple[int, int]) -> int:
    """Prompt tokens one image costs: START + thumbnail atoms + GRID [+ tiles with COL/ROW] + END."""
    rows, cols = grid
    if rows * cols == 1:
        return TOKENS_PER_CROP + 3
    return (TOKENS_PER_CROP + 1) * rows * cols + TOKENS_PER_CROP + 2


def crop_count(grid: tuple[int, int]) -> int:
    """Crops the vision tower sees: the only crop, or a thumbnail plus rows * cols tiles."""
    rows, cols = grid
    return 1 if rows * cols == 1 else rows * cols + 1


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # [num_crops, 3, 448, 448], thumbnail first
    grid: tuple[int, int]  # (rows, cols)
    content_hash: str  # identifies pixels + preprocessing; keys the visual and prefix caches

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_tokens(self) -> int:
        return image_token_count(self.grid)


@dataclass
class EngineInputs:
    prompt_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)

    @property
    def num_image_tokens(self) -> int:
        return sum(image.num_tokens for image in self.images)
