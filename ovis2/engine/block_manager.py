"""The paged KV pool's bookkeeping: which blocks each sequence owns, shared blocks, cached prefixes.

Plain Python. A block is `block_size` token slots in every layer's K and V pool. Blocks are
reference-counted: forked choices and prefix-cache hits share them. A full, computed block gets a hash
chained over (previous block's hash, its token ids, the content hashes of the images its atoms belong
to); a later request whose prefix hashes to the same chain reuses the block instead of recomputing it.
Free blocks that still hold a cached prefix stay findable until they are handed out again (LRU).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence

ROOT_MARK = b"\x00" * 17


def block_hash(previous: int | None, token_ids: tuple[int, ...], image_hashes: tuple[str, ...]) -> int:
    """128 bits of sha256 over the chain. Python's hash() of ints is predictable, so a client could craft a
    colliding prompt and read another's cached KV (vLLM's CVE-2025-25183); sha256 collisions cannot be made."""
    digest = hashlib.sha256(ROOT_MARK if previous is None else b"\x01" + previous.to_bytes(16, "little"))
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
        self.ref_counts = [0] * num_blocks
        self.block_hash_of: list[int | None] = [None] * num_blocks
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
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
            chain.append(block_hash(chain[-1] if chain else None, tuple(seq.token_ids[start:end]), images))
        return chain[index]

    # --- allocation
    def can_allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Can seq (owning no blocks yet) take `cached` and room for num_new_tokens more tokens?"""
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)
        needed = self.num_blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return needed + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached: list[int]) -> None:
        """Give seq its cached prefix blocks; later slots come from append_slots."""
        assert not seq.block_table, "allocate() is for a sequence that owns no blocks"
        for block_id in cached:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size

    def num_shared_blocks(self, parent: Sequence, child: Sequence) -> int:
        """Blocks child can take from parent: computed, holding only prompt tokens (a resumed child's own outputs
        differ from its parent's) and not the one holding child's last token (it must be computed)."""
        bs = self.block_size
        return min((child.num_tokens - 1) // bs, child.prompt_len // bs, parent.num_computed_tokens // bs)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares parent's computed full prompt blocks, except the one holding child's last token."""
        assert not child.block_table
        num_shared = self.num_shared_blocks(parent, child)
        for block_id in parent.block_table[:num_shared]:
            self._take(block_id)
            child.block_table.append(block_id)
        child.num_hashed_blocks = min(parent.num_hashed_blocks, num_shared)
        child.num_computed_tokens = num_shared * self.block_size

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
            self._register(seq.block_table[index], self.chain_hash(seq, index))
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

    def _register(self, block_id: int, value: int) -> None:
        if self.block_hash_of[block_id] is not None:
            return  # already cached (a prefix hit or a shared block)
        if value in self.cached_blocks:
            return  # an identical block exists; keep the first
        self.block_hash_of[block_id] = value
        self.cached_blocks[value] = block_id

    def _forget_hash(self, block_id: int) -> None:
        value = self.block_hash_of[block_id]
        if value is not None:
            self.block_hash_of[block_id] = None
            if self.cached_blocks.get(value) == block_id:
                del self.cached_blocks[value]
