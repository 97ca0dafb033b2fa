"""The visual side of a step: image embeddings from the vision tower or its cache, crop by crop as prefill
chunks reach them.

A request's embeddings ([num_atoms, H], `RequestEmbeddings`) fill in as its prefill chunks reach each crop's 256
atoms: the scheduler prices the crops a chunk needs against the step's budget (`crops_to_encode`), so a request
with many images or video frames does not hold every other stream for its whole vision tower time in one step.
Each step the tower runs once, on every crop the scheduled chunks need. An LRU cache keyed by (content hash, compat,
grid, cache salt) keeps each whole image's embeddings, so a later turn resending it skips the tower; while an image
is still being filled, a request reaching its crops later copies the crops already encoded (not with the cache off,
which keeps requests apart).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..image_layout import TOKENS_PER_CROP
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

    def __contains__(self, key: tuple) -> bool:
        return key in self.entries

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class RequestEmbeddings:
    """One request's image embeddings [num_atoms, H], crop by crop (a crop is 256 consecutive atoms)."""

    def __init__(self, num_atoms: int) -> None:
        self.rows: torch.Tensor | None = None  # allocated with the first crop, in its dtype and device
        self.ready = [False] * (num_atoms // TOKENS_PER_CROP)
        self.num_atoms = num_atoms

    def fill(self, first_crop: int, values: torch.Tensor) -> None:
        """values: [k * 256, H], crops first_crop .. first_crop + k - 1."""
        if self.rows is None:
            self.rows = values.new_empty(self.num_atoms, values.shape[-1])
        start = first_crop * TOKENS_PER_CROP
        self.rows[start : start + values.shape[0]] = values
        for crop in range(first_crop, first_crop + values.shape[0] // TOKENS_PER_CROP):
            self.ready[crop] = True

    def atoms(self, first: int, last: int) -> torch.Tensor:
        assert all(self.ready[c] for c in _crops_of(first, last)), (
            "atoms used before their crops were encoded"
        )
        return self.rows[first:last]


@dataclass
class _ImageCrops:
    """The crops of one image that atoms [first, end) of a request cover."""

    image: ImageInput
    key: tuple
    first_crop: int  # the image's first crop among the request's crops
    crops: range  # request-wide crop indices

    @property
    def all_crops(self) -> range:
        """The image's crops, request-wide."""
        return range(self.first_crop, self.first_crop + self.image.num_crops)


@dataclass
class _TowerWork:
    """Crops to run through the tower this step, each once, and where their embeddings go."""

    pixels: dict[tuple, torch.Tensor] = field(default_factory=dict)  # (key, crop in image) -> [3, 448, 448]
    targets: dict[tuple, list[tuple[RequestEmbeddings, int]]] = field(default_factory=dict)
    # (request, its image's first crop) -> the image, cached once whole
    images: dict[tuple, tuple[RequestEmbeddings, _ImageCrops]] = field(default_factory=dict)


class VisualEmbeddings:
    """The vision tower and its cache, for the scheduler (`crops_to_encode`) and the step (`prepare`)."""

    def __init__(self, model, compat: str, cache_size: int) -> None:
        self.model = model
        self.compat = compat
        self.device = model.device
        self.max_crops_per_call = 64 if self.device.type == "cuda" else 16
        self.cache = VisualCache(cache_size)
        self.num_encoded_images = 0  # images that went through the vision tower
        # image key -> the requests filling it: (their embeddings, held weakly; the image's first crop there)
        self._filling: dict[tuple, list[tuple[weakref.ref, int]]] = {}

    def key(self, image: ImageInput, cache_salt: str | None = None) -> tuple:
        """Salted like the prefix cache: a tenant cannot tell from its time to first token that another sent the
        same image."""
        return (image.content_hash, self.compat, tuple(image.grid), cache_salt)

    def encode_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, 448, 448] -> [N, 256, H]: the vision tower, in chunks that fit in memory."""
        chunks = pixel_values.split(self.max_crops_per_call)
        return torch.cat([self.model.get_image_embeddings(c.to(self.device)) for c in chunks])

    def crops_to_encode(self, group: SequenceGroup, first_atom: int, end_atom: int) -> int:
        """The crops the tower must run for the group's atoms [first_atom, end_atom) (none for cached images)."""
        count = 0
        for part in self._images_in(group, first_atom, end_atom):
            missing = _missing(group.image_embeds, part.crops)
            if missing and part.key not in self.cache:
                count += sum(self._encoded_elsewhere(part.key, c - part.first_crop) is None for c in missing)
        return count

    def _encoded_elsewhere(self, key: tuple, crop: int) -> torch.Tensor | None:
        """Crop `crop` of image `key` ([256, H]) where another request filling that image has it."""
        if self.cache.capacity <= 0:
            return None
        for holder, first_crop in self._filling.get(key, ()):
            embeddings = holder()
            if embeddings is not None and embeddings.ready[first_crop + crop]:
                start = (first_crop + crop) * TOKENS_PER_CROP
                return embeddings.rows[start : start + TOKENS_PER_CROP]
        return None

    @torch.inference_mode()
    def prepare(self, needs: list[tuple[SequenceGroup, int, int]]) -> dict[str, Exception]:
        """Make sure each (group, first_atom, end_atom) has the embeddings of those atoms.

        The crops all of them need run through the tower in one batch; if that fails, each group is retried
        alone so one bad request fails by itself. Returns {request_id: exception} for the failures."""
        needs = [need for need in needs if need[1] < need[2]]
        if not needs:
            return {}
        try:
            self._fill(needs)
        except Exception:  # noqa: BLE001 - isolate the failing request below
            return self._fill_one_by_one(needs)
        return {}

    def _fill_one_by_one(self, needs: list[tuple[SequenceGroup, int, int]]) -> dict[str, Exception]:
        failures: dict[str, Exception] = {}
        for need in needs:
            try:
                self._fill([need])
            except Exception as error:  # noqa: BLE001
                failures[need[0].request_id] = error
        return failures

    def _fill(self, needs: list[tuple[SequenceGroup, int, int]]) -> None:
        work = _TowerWork()
        for group, first_atom, end_atom in needs:
            if group.image_embeds is None:
                group.image_embeds = RequestEmbeddings(group.num_atoms)
            self._plan(group, first_atom, end_atom, work)
        if work.pixels:
            embeds = self.encode_crops(torch.stack(list(work.pixels.values())))  # [crops, 256, H]
            for index, crop in enumerate(work.pixels):
                for target, request_crop in work.targets[crop]:
                    target.fill(request_crop, embeds[index])
        for key in [key for key, holders in self._filling.items() if all(r() is None for r, _ in holders)]:
            del self._filling[key]  # its requests ended before the image was whole
        for target, part in work.images.values():
            crops = part.all_crops
            if part.key in self._filling and all(target.ready[c] for c in crops):
                del self._filling[part.key]  # whole: the cache serves it from now on
                rows = target.rows[crops.start * TOKENS_PER_CROP : crops.stop * TOKENS_PER_CROP]
                self.cache.put(part.key, rows.clone())
                self.num_encoded_images += 1

    def _plan(self, group: SequenceGroup, first_atom: int, end_atom: int, work: _TowerWork) -> None:
        """Copies cached images in; lists the other crops these atoms need in `work`."""
        target = group.image_embeds
        for part in self._images_in(group, first_atom, end_atom):
            missing = _missing(target, part.crops)
            if not missing:
                continue
            cached = self.cache.get(part.key)
            if cached is not None:
                target.fill(part.first_crop, cached)
                continue
            for crop in missing:
                local = (part.key, crop - part.first_crop)
                elsewhere = self._encoded_elsewhere(*local)
                if elsewhere is not None:
                    target.fill(crop, elsewhere)
                    continue
                if local not in work.pixels:
                    work.pixels[local] = part.image.pixel_values[local[1]]
                work.targets.setdefault(local, []).append((target, crop))
            self._register(part.key, target, part.first_crop)
            work.images[(id(target), part.first_crop)] = (target, part)

    def _register(self, key: tuple, target: RequestEmbeddings, first_crop: int) -> None:
        """target fills image `key` from its crop first_crop on (the dead holders of the key dropped)."""
        holders = [(ref, first) for ref, first in self._filling.get(key, ()) if ref() is not None]
        if not any(ref() is target and first == first_crop for ref, first in holders):
            holders.append((weakref.ref(target), first_crop))
        self._filling[key] = holders

    def _images_in(self, group: SequenceGroup, first_atom: int, end_atom: int) -> Iterator[_ImageCrops]:
        salt = group.inputs.cache_salt
        for image, span in zip(group.inputs.images, group.request.image_spans, strict=True):
            if span.atom_end <= first_atom:
                continue
            if span.atom_start >= end_atom:
                break
            crops = _crops_of(max(first_atom, span.atom_start), min(end_atom, span.atom_end))
            yield _ImageCrops(image, self.key(image, salt), span.atom_start // TOKENS_PER_CROP, crops)


def _crops_of(first_atom: int, end_atom: int) -> range:
    return range(first_atom // TOKENS_PER_CROP, -(-end_atom // TOKENS_PER_CROP))


def _missing(target: RequestEmbeddings | None, crops: range) -> list[int]:
    if target is None:
        return list(crops)
    return [c for c in crops if not target.ready[c]]
