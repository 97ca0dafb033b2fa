"""A request as the engine core takes it: inputs, sampling parameters, and where its image atoms sit."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Any

from ..inputs import EngineInputs
from ..tokenizer import IMAGE_ATOM_ID
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's atoms sit among the prompt's atoms: atom indices [atom_start, atom_end)."""

    content_hash: str
    atom_start: int
    atom_end: int


@dataclass
class EngineRequest:
    request_id: str
    inputs: EngineInputs
    params: SamplingParams
    arrival_time: float
    atom_positions: list[int]  # prompt positions of the image atoms, in order
    image_spans: list[ImageSpan]
    grammar: Any = (
        None  # a structured.Grammar compiled by input processing (params.structured_outputs), or None
    )

    @classmethod
    def build(
        cls,
        request_id: str,
        inputs: EngineInputs,
        params: SamplingParams,
        arrival_time: float | None = None,
        grammar: Any = None,
    ) -> EngineRequest:
        atom_positions = [i for i, t in enumerate(inputs.prompt_token_ids) if t == IMAGE_ATOM_ID]
        spans, start = [], 0
        for image in inputs.images:
            spans.append(ImageSpan(image.content_hash, start, start + image.num_atoms))
            start += image.num_atoms
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        return cls(request_id, inputs, params, arrival, atom_positions, spans, grammar)

    def atoms_before(self, position: int) -> int:
        """How many image atoms sit at prompt positions < position."""
        return bisect.bisect_left(self.atom_positions, position)

    def image_hashes_in(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the images owning the atoms at positions [start, end), in order."""
        first, last = self.atoms_before(start), self.atoms_before(end)
        if first == last:
            return ()
        return tuple(s.content_hash for s in self.image_spans if s.atom_start < last and s.atom_end > first)
