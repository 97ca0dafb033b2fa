"""Incremental, UTF-8 safe detokenization with stop strings.

`tokenizers`' DecodeStream holds back tokens that end inside a multi-byte character, so a delta never
carries half a character. Stop strings end the text exactly before the match (or after it, with
include_stop_str_in_output); the longest tail that could still grow into a stop string is held back
from deltas until it either matches or stops matching.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from .sampling_params import SamplingParams


def backend_of(tokenizer):
    """A `tokenizers.Tokenizer` from either a transformers fast tokenizer or the backend itself."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.tokenizer = backend_of(tokenizer)
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stops = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self.text = ""
        self.num_emitted_chars = 0

    def add_token(self, token_id: int, check_stops: bool = True) -> str | None:
        """Decode one more token; returns the stop string it completed, if any (the text is cut there).

        check_stops=False (min_tokens not out yet): a stop string this token completes is ignored, as in vLLM."""
        chunk = self.stream.step(self.tokenizer, token_id)
        if not chunk:
            return None
        old_len = len(self.text)
        self.text += chunk
        return self._check_stops(old_len) if self.stops and check_stops else None

    def _check_stops(self, old_len: int) -> str | None:
        """The earliest stop string that ends in the new text (past old_len)."""
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[: index + len(stop)] if self.include_stop else self.text[:index]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, a tail that may start a stop string stays back."""
        end = len(self.text) if finished else len(self.text) - self._held_back()
        if end <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta

    def _held_back(self) -> int:
        held = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return held
