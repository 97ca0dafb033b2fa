"""The one source of the image-token layout: tokens per crop, placeholder ids, crop and token counts.

One image in a prompt is START, the thumbnail's atoms, GRID, then for a grid of more than one tile each tile's
atoms row by row (COL between tiles of a row, ROW between rows), then END. A 1x1 grid has only the thumbnail.
"""

from __future__ import annotations

from .errors import Ovis2Error
from .tokenizer import IMAGE_ATOM_ID, VISUAL_INDICATOR_IDS

TOKENS_PER_CROP = 256  # (448 / 14 / 2) ** 2: visual tokens of one 448px crop after the hidden stride
START_ID, GRID_ID, COL_ID, ROW_ID, END_ID = VISUAL_INDICATOR_IDS
MAX_TILES_PER_IMAGE = 64  # refuse requests whose grid search or token cost would be absurd
IMAGE_TOKEN_IDS = frozenset(
    (IMAGE_ATOM_ID, *VISUAL_INDICATOR_IDS)
)  # never generated: only the prompt has them


def crop_count(grid: tuple[int, int]) -> int:
    """Crops the vision tower sees: the only crop, or a thumbnail plus rows * cols tiles."""
    rows, cols = grid
    return 1 if rows * cols == 1 else rows * cols + 1


def atom_count(grid: tuple[int, int]) -> int:
    """Image atoms (embedding rows) one image puts in the prompt."""
    return crop_count(grid) * TOKENS_PER_CROP


def token_count(grid: tuple[int, int]) -> int:
    """Prompt tokens one image costs: its atoms plus START, GRID, END and the COL/ROW separators."""
    rows, cols = grid
    if rows * cols == 1:
        return TOKENS_PER_CROP + 3
    separators = rows * (cols - 1) + rows - 1
    return atom_count(grid) + 3 + separators


def placeholder_ids(grid: tuple[int, int], tokens_per_crop: int = TOKENS_PER_CROP) -> list[int]:
    """The prompt ids of one image with this (rows, cols) grid (other crop sizes: parity tests' towers)."""
    rows, cols = (int(n) for n in grid)
    atoms = [IMAGE_ATOM_ID] * tokens_per_crop
    ids = [START_ID, *atoms, GRID_ID]
    if rows * cols > 1:
        for row in range(rows):
            for col in range(cols):
                ids += atoms if col == cols - 1 else [*atoms, COL_ID]
            if row < rows - 1:
                ids.append(ROW_ID)
    ids.append(END_ID)
    return ids


def check_tokens_per_crop(vision_config) -> None:
    """The layout assumes 256 visual tokens per crop; refuse a checkpoint whose vision tower gives another count."""
    if vision_config.tokens_per_crop != TOKENS_PER_CROP:
        raise Ovis2Error(
            f"this vision tower gives {vision_config.tokens_per_crop} tokens per crop (image_size "
            f"{vision_config.image_size}, patch_size {vision_config.patch_size}, hidden_stride "
            f"{vision_config.hidden_stride}); Ovis2 prompts are laid out for {TOKENS_PER_CROP}"
        )
