"""A compiled grammar as the engine core takes it, and the matcher each of a request's choices advances.

The core knows no text: a Grammar is compiled by input processing (which has the tokenizer) and only makes
matchers; a matcher takes token ids and fills allowed-token bitmasks. A matcher has accepted exactly the
choice's output tokens, so a preempted choice (recomputed later from its tokens) keeps its matcher as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from ...errors import StructuredOutputError
from .bitmask import bitmask_width

WHAT = {
    "json": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


class Grammar:
    """An xgrammar CompiledGrammar, shared by every request with the same constraint (immutable)."""

    def __init__(self, compiled, kind: str, compile_seconds: float = 0.0) -> None:
        self.compiled = compiled
        self.kind = kind
        self.compile_seconds = compile_seconds

    @property
    def memory_bytes(self) -> int:
        return int(self.compiled.memory_size_bytes)

    def matcher(self, stop_token_ids: Iterable[int]) -> GrammarMatcher:
        """A fresh matcher; once the grammar is complete it allows only `stop_token_ids`."""
        return GrammarMatcher(self.compiled, sorted(stop_token_ids), self.kind)

    def __repr__(self) -> str:
        return f"Grammar({self.kind})"


class GrammarMatcher:
    """One choice's place in its grammar."""

    def __init__(self, compiled, stop_token_ids: list[int], kind: str = "grammar") -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self._vocab_size = compiled.tokenizer_info.vocab_size
        self.kind = kind
        self.num_accepted_tokens = 0
        self._seconds = 0.0  # spent matching since `take_seconds` last read it

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar does not allow it."""
        start = time.perf_counter()
        accepted = self._matcher.accept_token(token_id)
        self._seconds += time.perf_counter() - start
        self.num_accepted_tokens += accepted
        return accepted

    def fill_bitmask(self, bitmask, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row] ([rows, ceil(V / 32)] int32, CPU); False when every
        token is allowed (the row needs no masking)."""
        start = time.perf_counter()
        allows_less = self._matcher.fill_next_token_bitmask(bitmask, row)
        self._seconds += time.perf_counter() - start
        return allows_less

    def take_seconds(self) -> float:
        """Seconds spent matching (filling bitmasks, accepting tokens) since the last call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def allows_nothing(self) -> bool:
        """No token may come next, not even a stop token: the tokens so far begin no text the grammar matches."""
        bitmask = torch.zeros((1, bitmask_width(self._vocab_size)), dtype=torch.int32)
        return self.fill_bitmask(bitmask, 0) and not bool(bitmask.any())

    def refusal(self, token_id: int) -> Exception:
        """Why `token_id` was not accepted: the request's constraint at a dead end (a StructuredOutputError, the
        client's to fix), else an engine fault."""
        if self.allows_nothing():
            return StructuredOutputError(
                f"the {WHAT[self.kind]} allows no token after the {self.num_accepted_tokens} generated so far: "
                "the text it admits at first can never be completed (a constraint that contradicts itself?)"
            )
        return RuntimeError(f"the grammar refused the sampled token {token_id}")

    @property
    def is_terminated(self) -> bool:
        """A stop token was accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    @property
    def is_completed(self) -> bool:
        """The tokens so far form a whole sentence of the grammar (a stop token may come next)."""
        return self._matcher.is_completed()


def too_slow_to_follow(matchers: list[tuple[str, GrammarMatcher]], limit: float) -> dict[str, Exception]:
    """The requests whose matchers ((request id, matcher), a request's choices together) took longer than `limit`
    seconds since the last call (a step's token), and why: matching runs on the engine's thread, so every other
    stream waits for it. Every matcher's time is read."""
    seconds: dict[str, float] = {}
    for request_id, matcher in matchers:
        seconds[request_id] = seconds.get(request_id, 0.0) + matcher.take_seconds()
    return {
        request_id: StructuredOutputError(
            f"following the constraint took {spent:.2f} s for one token (the limit is {limit} s): it is too "
            "ambiguous to match at serving speed (a grammar with several ways to read the same text?)"
        )
        for request_id, spent in seconds.items()
        if spent > limit
    }
