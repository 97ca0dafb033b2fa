"""A prompt ready for the engine: token ids with image placeholders expanded, and the pixels of its images and
video frames (each frame an ImageInput of one crop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import image_layout

if TYPE_CHECKING:
    import torch


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # [num_crops, 3, 448, 448], thumbnail first
    grid: tuple[int, int]  # (rows, cols)
    content_hash: str  # identifies pixels + preprocessing; keys the visual and prefix caches
    is_video_frame: bool = False  # a sampled frame of a video part (one crop), not an image part

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_tokens(self) -> int:
        return image_layout.token_count(self.grid)

    @property
    def num_atoms(self) -> int:
        return image_layout.atom_count(self.grid)


@dataclass
class EngineInputs:
    prompt_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    cache_salt: str | None = None  # the prefix and visual caches share only among inputs with the same salt

    @property
    def num_image_tokens(self) -> int:
        """Image and video frame tokens."""
        return sum(image.num_tokens for image in self.images)

    @property
    def num_video_frames(self) -> int:
        return sum(1 for image in self.images if image.is_video_frame)
