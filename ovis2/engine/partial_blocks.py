"""Prefix hits past the last whole cached block: the cached blocks a request may borrow the leading slots of.

Each cached text block is listed under its parent's key (the parent block's chain hash, or for a first block
the request's cache salt) with its token ids, the PARTIAL_CANDIDATES newest per parent. The listed child sharing
the most leading tokens with a request's next block lends those slots' KV, copied into the request's own block
before the step runs (SlotCopy). So a shared prefix that ends mid-block, such as the chat template's default
system turn (14 tokens), is computed once, not once per request. The lent run is cut back to the last chat-turn
boundary in it (after `<|im_end|>` or a turn's `<|im_start|>role\\n` header): a hit, which a client sees in
`cached_tokens` and in its time to first token, then says no more than that a whole block, or the part of one up
to a turn boundary, matched someone's cached one, so a cached prompt cannot be read back a token at a time.
A request's later choices (n > 1) borrow the same way from its first choice's last, partial prompt block
(BlockManager.fork_partial_block; no cut: the slots are the same request's), so they compute only their last
prompt token. Plain Python.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..tokenizer import IM_END_ID, IM_START_ID, NEWLINE_ID

PARTIAL_CANDIDATES = 32  # cached children of one parent compared token by token: the most recently cached
ParentKey = int | str | None  # a parent block's chain hash; a first block's: the cache salt or None


@dataclass(frozen=True)
class PartialHit:
    """The first `num_tokens` slots of cached block `block_id` hold the KV a request's next block starts with."""

    block_id: int
    num_tokens: int


@dataclass(frozen=True)
class SlotCopy:
    """Copy the KV of slots [0, num_slots) of block `source` into block `target`, before the step's forward.

    The source is not referenced: a free cached block may be handed out in the same step (even as the target).
    That is safe because the copies run once, all reads before any write, before anything of the step writes
    KV; whatever runs between scheduling and the copies must not write the pool."""

    source: int
    target: int
    num_slots: int


class PartialBlocks:
    """The listed blocks, by parent key; the block manager lists a block when it caches it and unlists it when
    the block is handed out again."""

    def __init__(self) -> None:
        self.children: dict[ParentKey, OrderedDict[int, tuple[int, ...]]] = {}  # parent -> {block: tokens}
        self.parent_of: dict[int, ParentKey] = {}  # block id -> its key in `children`

    def add(self, parent: ParentKey, block_id: int, tokens: tuple[int, ...]) -> None:
        siblings = self.children.setdefault(parent, OrderedDict())
        siblings[block_id] = tokens
        self.parent_of[block_id] = parent
        if len(siblings) > PARTIAL_CANDIDATES:
            oldest, _ = siblings.popitem(last=False)
            del self.parent_of[oldest]

    def remove(self, block_id: int) -> None:
        if block_id not in self.parent_of:
            return
        parent = self.parent_of.pop(block_id)
        siblings = self.children[parent]
        del siblings[block_id]
        if not siblings:
            del self.children[parent]

    def touch(self, block_id: int) -> None:
        """A block that lent stays among the candidates as if it were cached now."""
        if block_id in self.parent_of:
            self.children[self.parent_of[block_id]].move_to_end(block_id)

    def best(self, parent: ParentKey, token_ids: list[int], start: int, limit: int) -> PartialHit | None:
        """The listed child of `parent` sharing the longest run with token_ids[start:start + limit], cut back to
        its last chat-turn boundary; None when no such run is shared."""
        candidates = self.children.get(parent)
        if limit < 1 or not candidates:
            return None
        wanted = token_ids[start : start + limit]
        best = PartialHit(-1, 0)
        for block_id, tokens in reversed(candidates.items()):
            shared = _shared_prefix(tokens, wanted)
            if shared > best.num_tokens:
                best = PartialHit(block_id, shared)
                if shared == limit:
                    break
        lent = _through_turn_boundary(token_ids, start, best.num_tokens)
        return PartialHit(best.block_id, lent) if lent else None


def _through_turn_boundary(token_ids: list[int], start: int, length: int) -> int:
    """The longest n <= length such that token_ids[start:start + n] ends a chat turn or a turn's header: its last
    token is <|im_end|>, the newline after one, or the newline of `<|im_start|>role\\n`."""
    for n in range(length, 0, -1):
        last = start + n - 1
        token = token_ids[last]
        if token == IM_END_ID:
            return n
        if token == NEWLINE_ID and last >= 1 and token_ids[last - 1] == IM_END_ID:
            return n
        if token == NEWLINE_ID and last >= 2 and token_ids[last - 2] == IM_START_ID:
            return n
    return 0


def _shared_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading token ids a and b share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
