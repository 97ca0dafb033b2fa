"""Prompt builders for engine tests: chat-shaped token ids with expanded image placeholders."""

from __future__ import annotations

import hashlib

import torch

from ovis2.image_layout import crop_count, placeholder_ids
from ovis2.inputs import EngineInputs, ImageInput
from ovis2.tokenizer import IM_END_ID, IM_START_ID


def image_token_ids(grid: tuple[int, int]) -> list[int]:
    return placeholder_ids(grid)


def random_image(seed: int, grid: tuple[int, int] = (1, 1)) -> ImageInput:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(crop_count(grid), 3, 448, 448, generator=generator)  # [crops, 3, 448, 448]
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16]
    return ImageInput(pixels, grid, f"{digest}-{grid}")


def chat_prompt(text_ids: list[int], images: list[ImageInput] = ()) -> EngineInputs:
    ids = [IM_START_ID, 8948, 198, 2610, 525, 264, 10950, 17847, 13, IM_END_ID, 198, IM_START_ID, 872, 198]
    for image in images:
        ids += image_token_ids(image.grid) + [198]
    ids += list(text_ids) + [IM_END_ID, 198, IM_START_ID, 77091, 198]
    return EngineInputs(ids, list(images))


def text_ids(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 30000, (length,), generator=generator).tolist()
