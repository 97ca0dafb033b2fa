"""A compiled grammar as the engine core takes it, and the matcher each of a request's choices advances.

The core knows no text: a Grammar is compiled by input processing (which has the tokenizer) and only makes
matchers; a matcher takes token ids and fills allowed-token bitmasks. A matcher has accepted exactly the
choice's output tokens, so a preempted choice (recomputed later from its tokens) keeps its matcher as it is.
"""

from __future__ import annotations

from collections.abc import Iterable


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
        return GrammarMatcher(self.compiled, sorted(stop_token_ids))

    def __repr__(self) -> str:
        return f"Grammar({self.kind})"


class GrammarMatcher:
    """One choice's place in its grammar."""

    def __init__(self, compiled, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self.num_accepted_tokens = 0

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar does not allow it."""
        accepted = self._matcher.accept_token(token_id)
        self.num_accepted_tokens += accepted
        return accepted

    def fill_bitmask(self, bitmask, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row] ([rows, ceil(V / 32)] int32, CPU); False when every
        token is allowed (the row needs no masking)."""
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """A stop token was accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    @property
    def is_completed(self) -> bool:
        """The tokens so far form a whole sentence of the grammar (a stop token may come next)."""
        return self._matcher.is_completed()
