"""The visual side of a step: each group's image embeddings, from the vision tower or its cache.

The tower runs once per new image, on the crops of every image that arrives in the same step together, and an LRU
cache keyed by (content hash, compat, grid, cache salt) keeps the embeddings so a later turn resending the same
image skips the tower.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..inputs import ImageInput
from .sequence import SequenceGroup


class VisualCache:
    """LRU of visual embeddings: key -> [num_crops * 256, H] on the model's device."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class VisualEmbeddings:
    """The vision tower and its cache, for the model runner: `prepare(groups)` each step."""

    def __init__(self, model, compat: str, cache_size: int) -> None:
        self.model = model
        self.compat = compat
        self.device = model.device
        self.max_crops_per_call = 64 if self.device.type == "cuda" else 16
        self.cache = VisualCache(cache_size)
        self.num_encoded_images = 0  # images that went through the vision tower

    def key(self, image: ImageInput, cache_salt: str | None = None) -> tuple:
        """Salted like the prefix cache: a tenant cannot tell from its time to first token that another sent the
        same image."""
        return (image.content_hash, self.compat, tuple(image.grid), cache_salt)

    def encode_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, 448, 448] -> [N, 256, H]: the vision tower, in chunks that fit in memory."""
        chunks = pixel_values.split(self.max_crops_per_call)
        return torch.cat([self.model.get_image_embeddings(c.to(self.device)) for c in chunks])

    @torch.inference_mode()
    def prepare(self, groups: list[SequenceGroup]) -> dict[str, Exception]:
        """Make sure each group that prefills image atoms holds its image embeddings.

        Crops of all uncached images are encoded in one batch; if that fails, each group is retried
        alone so one bad request fails by itself. Returns {request_id: exception} for the failures.
        """
        todo = [g for g in groups if g.image_embeds is None and g.needs_image_embeds]
        if not todo:
            return {}
        missing = self._missing_images(todo)
        try:
            fresh = self._encode_images(missing)
        except Exception:  # noqa: BLE001 - isolate the failing request below
            return self._prepare_one_by_one(todo)
        for group in todo:
            group.image_embeds = self._assemble(group, fresh)
        return {}

    def _prepare_one_by_one(self, groups: list[SequenceGroup]) -> dict[str, Exception]:
        failures: dict[str, Exception] = {}
        for group in groups:
            try:
                fresh = self._encode_images(self._missing_images([group]))
                group.image_embeds = self._assemble(group, fresh)
            except Exception as error:  # noqa: BLE001
                failures[group.request_id] = error
        return failures

    def _missing_images(self, groups: list[SequenceGroup]) -> dict[tuple, ImageInput]:
        missing: dict[tuple, ImageInput] = {}
        for group in groups:
            for image in group.inputs.images:
                key = self.key(image, group.inputs.cache_salt)
                if key not in missing and self.cache.get(key) is None:
                    missing[key] = image
        return missing

    def _encode_images(self, images: dict[tuple, ImageInput]) -> dict[tuple, torch.Tensor]:
        """Runs the tower on every crop of these images (by visual key) at once; key -> [num_crops * 256, H]."""
        if not images:
            return {}
        pixels = torch.cat([image.pixel_values for image in images.values()])  # [all crops, 3, 448, 448]
        embeds = self.encode_crops(pixels)  # [all crops, 256, H]
        self.num_encoded_images += len(images)
        fresh = {}
        parts = embeds.split([image.num_crops for image in images.values()])
        for key, part in zip(images, parts, strict=True):
            fresh[key] = part.flatten(0, 1)
            self.cache.put(key, fresh[key])
        return fresh

    def _assemble(self, group: SequenceGroup, fresh: dict[tuple, torch.Tensor]) -> torch.Tensor:
        parts = []
        for image in group.inputs.images:
            key = self.key(image, group.inputs.cache_salt)
            part = fresh.get(key)
            if part is None:
                part = self.cache.get(key)
            if part is None:  # evicted by a bigger batch: encode again, alone
                part = self._encode_images({key: image})[key]
            parts.append(part)
        return torch.cat(parts)  # [num_atoms, H]
