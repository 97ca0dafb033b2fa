"""The paged KV pool's bookkeeping: which blocks each sequence owns, shared blocks, cached prefixes.

Plain Python. A block is `block_size` token slots in every layer's K and V pool. Blocks are
reference-counted: forked choices and prefix-cache hits share them. A full, computed block gets a hash
chained over (previous block's hash, its token ids, the content hashes of the images its atoms belong
to); a later request whose prefix hashes to the same chain reuses the block instead of recomputing it.
Free blocks that still hold a cached prefix stay findable until they are handed out again (LRU).

Past the last whole cached block, a request may also borrow the leading slots of one more cached block
(partial_blocks.py).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .partial_blocks import ParentKey, PartialBlocks, PartialHit
from .sequence import Sequence

ROOT_MARK = b"\x00" * 17


def block_hash(
    previous: int | None, token_ids: tuple[int, ...], image_hashes: tuple[str, ...], salt: str | None = None
) -> int:
    """128 bits of sha256 over the chain. Python's hash() of ints is predictable, so a client could craft a
    colliding prompt and read another's cached KV (vLLM's CVE-2025-25183); sha256 collisions cannot be made.
    A request's cache salt enters its first block's hash, so the whole chain: different salts share nothing."""
    assert salt is None or previous is None, "only the first block is salted"
    digest = hashlib.sha256(ROOT_MARK if previous is None else b"\x01" + previous.to_bytes(16, "little"))
    if salt is not None:
        encoded = salt.encode()
        digest.update(b"\x03" + len(encoded).to_bytes(8, "little") + encoded)
    digest.update(array("q", token_ids).tobytes())
    for image in image_hashes:
        digest.update(b"\x02" + image.encode())
    return int.from_bytes(digest.digest()[:16], "little")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # partial hits and n > 1 forks may lend slots (benchmarks and tests switch it off to compare)
        self.lends_partial_blocks = True
        self.ref_counts = [0] * num_blocks
        self.block_hash_of: list[int | None] = [None] * num_blocks
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
        self.partials = PartialBlocks()  # cached text blocks that may lend their leading slots
        self.free_blocks: OrderedDict[int, None] = OrderedDict(
            (i, None) for i in range(num_blocks)
        )  # LRU first

    # --- derived state
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache
    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of seq; never the block holding its last token (it must be computed)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for index in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cached_blocks.get(self.chain_hash(seq, index))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def find_partial_block(self, seq: Sequence, num_cached: int) -> PartialHit | None:
        """The cached text block sharing the most leading tokens with seq's block `num_cached` (the first that
        find_cached_blocks did not cover), the run cut back to its last chat-turn boundary and never reaching
        seq's last token; None when no such run is shared."""
        if not (self.enable_prefix_caching and self.lends_partial_blocks):
            return None
        bs = self.block_size
        start = num_cached * bs
        limit = min(bs - 1, seq.num_tokens - 1 - start)
        hit = self.partials.best(self._parent_key(seq, num_cached), seq.token_ids, start, limit)
        if hit is None or seq.request.image_hashes_in(start, start + hit.num_tokens):
            return None
        return hit

    def chain_hash(self, seq: Sequence, index: int) -> int:
        """The hash of seq's full block `index`, chained over the blocks before it. Computed once per sequence
        (a full block's tokens never change), so a request waiting at the head of the queue is not re-hashed
        every step."""
        chain, bs = seq.hash_chain, self.block_size
        while len(chain) <= index:
            start, end = len(chain) * bs, (len(chain) + 1) * bs
            assert end <= seq.num_tokens, "only full blocks have a hash"
            images = (
                seq.request.image_hashes_in(start, min(end, seq.prompt_len)) if start < seq.prompt_len else ()
            )
            tokens = tuple(seq.token_ids[start:end])
            if chain:
                chain.append(block_hash(chain[-1], tokens, images))
            else:
                chain.append(block_hash(None, tokens, images, seq.request.inputs.cache_salt))
        return chain[index]

    # --- allocation
    def can_allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Can seq (owning no blocks yet) take `cached` and room for num_new_tokens more tokens?"""
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)
        needed = self.num_blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return needed + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached: list[int], partial: PartialHit | None = None) -> None:
        """Give seq its cached prefix blocks; later slots come from append_slots. With `partial`, seq's next
        block starts computed: the caller copies those slots' KV in (SlotCopy) before the step runs."""
        assert not seq.block_table, "allocate() is for a sequence that owns no blocks"
        for block_id in cached:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size + (partial.num_tokens if partial else 0)
        if partial is not None:
            self.partials.touch(partial.block_id)

    def num_shared_blocks(self, parent: Sequence, child: Sequence) -> int:
        """Blocks child can take from parent: computed, holding only prompt tokens (a resumed child's own outputs
        differ from its parent's) and not the one holding child's last token (it must be computed)."""
        bs = self.block_size
        return min((child.num_tokens - 1) // bs, child.prompt_len // bs, parent.num_computed_tokens // bs)

    def fork_partial_block(self, parent: Sequence, child: Sequence, num_shared: int) -> PartialHit | None:
        """The computed prompt tokens of parent's block `num_shared` (past the blocks child shares) that child can
        copy instead of computing, never child's last token; None when there are none or lending is off."""
        if not self.lends_partial_blocks or len(parent.block_table) <= num_shared:
            return None
        start = num_shared * self.block_size
        end = min(parent.num_computed_tokens, child.prompt_len, child.num_tokens - 1)
        return PartialHit(parent.block_table[num_shared], end - start) if end > start else None

    def fork(self, parent: Sequence, child: Sequence, partial: PartialHit | None = None) -> None:
        """child shares parent's computed full prompt blocks, except the one holding child's last token. With
        `partial` (fork_partial_block), child's next block starts computed: the caller copies those slots' KV in
        (SlotCopy) before the step runs."""
        assert not child.block_table
        num_shared = self.num_shared_blocks(parent, child)
        for block_id in parent.block_table[:num_shared]:
            self._take(block_id)
            child.block_table.append(block_id)
        child.num_hashed_blocks = min(parent.num_hashed_blocks, num_shared)
        child.num_computed_tokens = num_shared * self.block_size + (partial.num_tokens if partial else 0)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for num_new_tokens more tokens of seq."""
        for _ in range(self.num_new_blocks(seq, num_new_tokens)):
            block_id, _ = self.free_blocks.popitem(last=False)
            self._forget_hash(block_id)
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def commit_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        while seq.num_hashed_blocks < num_full:
            index = seq.num_hashed_blocks
            block_id = seq.block_table[index]
            if self._register(block_id, self.chain_hash(seq, index)):
                self._list_child(seq, index, block_id)
            seq.num_hashed_blocks += 1

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its last blocks become the first to be reused (they are the least shared)."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_id in range(self.num_total_blocks):
            self._forget_hash(block_id)

    # --- helpers
    def _take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def _register(self, block_id: int, value: int) -> bool:
        """Cache block_id under value; False when it was cached already or an identical block is."""
        if self.block_hash_of[block_id] is not None:
            return False  # already cached (a prefix hit or a shared block)
        if value in self.cached_blocks:
            return False  # an identical block exists; keep the first
        self.block_hash_of[block_id] = value
        self.cached_blocks[value] = block_id
        return True

    def _list_child(self, seq: Sequence, index: int, block_id: int) -> None:
        """Offer seq's cached block `index` for partial reuse, unless it holds image atoms."""
        bs = self.block_size
        start, end = index * bs, (index + 1) * bs
        if start < seq.prompt_len and seq.request.image_hashes_in(start, min(end, seq.prompt_len)):
            return
        self.partials.add(self._parent_key(seq, index), block_id, tuple(seq.token_ids[start:end]))

    def _parent_key(self, seq: Sequence, index: int) -> ParentKey:
        """Where seq's block `index` is listed among candidates for partial hits: under its parent block's hash,
        or, for a first block, under the request's cache salt (None without one)."""
        return self.chain_hash(seq, index - 1) if index else seq.request.inputs.cache_salt

    def _forget_hash(self, block_id: int) -> None:
        value = self.block_hash_of[block_id]
        if value is not None:
            self.block_hash_of[block_id] = None
            if self.cached_blocks.get(value) == block_id:
                del self.cached_blocks[value]
        self.partials.remove(block_id)
