from ovis2.engine.block_manager import BlockManager
from ovis2.engine.partial_blocks import PARTIAL_CANDIDATES, PartialHit
from ovis2.engine.request import EngineRequest
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.sequence import SequenceGroup
from ovis2.inputs import EngineInputs, ImageInput
from ovis2.tokenizer import IM_END_ID, IM_START_ID, IMAGE_ATOM_ID, NEWLINE_ID


def make_seq(ids, images=(), n=1):
    return SequenceGroup(
        EngineRequest.build("r", EngineInputs(list(ids), list(images)), SamplingParams(n=n))
    ).seqs[0]


def admit(bm: BlockManager, seq):
    cached = bm.find_cached_blocks(seq)
    new = seq.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(seq, cached, new)
    bm.allocate(seq, cached)
    bm.append_slots(seq, new)
    seq.num_computed_tokens += new
    bm.commit_computed(seq)
    return cached


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(10))
    admit(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 7
    bm.free(seq)
    assert bm.num_free_blocks == 10 and seq.block_table == []


def test_prefix_hit_shares_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    first = make_seq(range(12))
    admit(bm, first)
    second = make_seq(range(12))
    hits = admit(bm, second)
    assert hits == first.block_table[:2]  # the block holding token 11 is recomputed
    assert second.num_cached_tokens == 0 and bm.ref_counts[hits[0]] == 2
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 10


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_seq(range(9))
    admit(bm, first)
    bm.free(first)
    again = make_seq(range(9))
    assert len(bm.find_cached_blocks(again)) == 2
    other = make_seq(range(100, 116))  # takes every block: the cache entries are evicted
    admit(bm, other)
    bm.free(other)
    assert bm.find_cached_blocks(make_seq(range(9))) == []


def test_image_content_hash_separates_identical_token_ids():
    bm = BlockManager(num_blocks=64, block_size=16)
    ids = [1, 2] + [IMAGE_ATOM_ID] * 256 + [3, 4]

    def image(tag):
        return ImageInput(pixel_values=None, grid=(1, 1), content_hash=tag)

    admit(bm, make_seq(ids, [image("cat")]))
    assert len(bm.find_cached_blocks(make_seq(ids, [image("cat")]))) == 16
    assert bm.find_cached_blocks(make_seq(ids, [image("dog")])) == []


def test_fork_shares_prompt_blocks_and_counts_references():
    bm = BlockManager(num_blocks=20, block_size=4, enable_prefix_caching=False)
    group = SequenceGroup(EngineRequest.build("r", EngineInputs(list(range(10))), SamplingParams(n=2)))
    parent, child = group.seqs
    admit(bm, parent)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    assert bm.ref_counts[parent.block_table[0]] == 2
    bm.append_slots(child, 2)
    assert child.block_table[2] != parent.block_table[2]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 20


def test_no_prefix_caching_means_no_hits():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    admit(bm, make_seq(range(12)))
    assert bm.find_cached_blocks(make_seq(range(12))) == []


S, E, N, USER = IM_START_ID, IM_END_ID, NEWLINE_ID, 872


def test_a_prefix_ending_mid_block_borrows_a_cached_block_through_its_last_turn_boundary():
    bm = BlockManager(num_blocks=10, block_size=4)
    first = make_seq([1, 2, E, N, S, USER, N, 5, 6])  # blocks [1 2 E N] [S USER N 5] [6]
    admit(bm, first)
    other = make_seq([1, 2, E, N, S, USER, N, 70, 80])
    cached = bm.find_cached_blocks(other)
    assert cached == first.block_table[:1]
    hit = bm.find_partial_block(other, 1)
    assert hit == PartialHit(first.block_table[1], 3)  # through the header's newline
    bm.allocate(other, cached, hit)
    assert other.num_computed_tokens == 7 and other.block_table == first.block_table[:1]
    assert bm.find_partial_block(make_seq([1, 2, E, 7, 8]), 0).num_tokens == 3  # through <|im_end|>
    assert bm.find_partial_block(make_seq([1, 2, 7, 8]), 0) is None  # mid-message: no boundary
    assert bm.find_partial_block(make_seq([1, 2, E, N, S, USER, 9, 9]), 1) is None  # cut back to nothing
    assert bm.find_partial_block(make_seq([9, 2, E, N, S]), 0) is None  # nothing shared


def test_a_partial_hit_stops_before_the_last_token_and_never_lends_image_atoms():
    bm = BlockManager(num_blocks=20, block_size=4)
    admit(bm, make_seq([1, 2, 3, 4, E, N, E, N, 5]))
    assert (
        bm.find_partial_block(make_seq([1, 2, 3, 4, E, N, E, N]), 1).num_tokens == 3
    )  # the last is computed
    assert bm.find_partial_block(make_seq([1, 2, 3, 4, E, N, E]), 1).num_tokens == 2

    def image(tag):
        return ImageInput(pixel_values=None, grid=(1, 1), content_hash=tag)

    header = [1, 2, 3, 4, E, N, S, USER, N]
    cat = make_seq(header + [IMAGE_ATOM_ID] * 256 + [3, 4], [image("cat")])
    admit(bm_images := BlockManager(num_blocks=200, block_size=4), cat)
    dog = make_seq(header + [IMAGE_ATOM_ID] * 256 + [3, 4], [image("dog")])
    assert bm_images.find_cached_blocks(dog) == cat.block_table[:2]  # the text before the image
    assert bm_images.find_partial_block(dog, 2) is None  # block 2 holds the cat's atoms: never lent
    assert bm_images.find_partial_block(make_seq(header + [E, N, 7]), 2) is None  # not even its text


def test_partial_candidates_are_the_newest_cached_blocks_still_in_the_pool():
    bm = BlockManager(num_blocks=200, block_size=8)
    seqs = [make_seq([S, USER, N, 100 + k, E, N, 0, 1, 2]) for k in range(PARTIAL_CANDIDATES + 1)]
    for seq in seqs:
        admit(bm, seq)
    assert bm.find_partial_block(make_seq([S, USER, N, 100, E, N, 5, 5, 5]), 0).num_tokens == 3  # oldest gone
    newest = bm.find_partial_block(make_seq([S, USER, N, 100 + PARTIAL_CANDIDATES, E, N, 5, 5, 5]), 0)
    assert newest == PartialHit(seqs[-1].block_table[0], 6)
    borrower = make_seq([S, USER, N, 101, E, N, 5, 5, 5])
    lender = bm.find_partial_block(borrower, 0)
    assert lender == PartialHit(seqs[1].block_table[0], 6)  # the oldest still listed
    bm.allocate(borrower, [], lender)  # lending keeps it listed as if it were cached now
    seqs.append(make_seq([S, USER, N, 999, E, N, 0, 1, 2]))
    admit(bm, seqs[-1])  # one more sibling: the oldest but the lender go
    assert bm.find_partial_block(make_seq([S, USER, N, 101, E, N, 7, 7, 7]), 0) == lender
    assert bm.find_partial_block(make_seq([S, USER, N, 102, E, N, 7, 7, 7]), 0).num_tokens == 3
    bm.free(borrower)
    for seq in seqs:
        bm.free(seq)
    taker = make_seq([S, USER, N] + list(range(1000, 1000 + 8 * 200 - 3)))  # every block handed out again
    admit(bm, taker)
    assert bm.find_partial_block(make_seq([S, USER, N, 100, E, N, 5, 5, 5]), 0) == PartialHit(
        taker.block_table[0], 3
    )
    assert set(bm.partials.parent_of) == set(taker.block_table)  # the reused blocks left the candidate lists
    assert sum(map(len, bm.partials.children.values())) == len(taker.block_table)
    bm.reset_prefix_cache()
    assert bm.partials.children == {} and bm.partials.parent_of == {}
    assert bm.find_partial_block(make_seq([S, USER, N, 100, E]), 0) is None


def test_block_hash_is_a_cryptographic_digest_stable_across_processes():
    """Python's hash() varies per process for strings and is predictable for ints; the chain must be neither."""
    import subprocess
    import sys

    from ovis2.engine.block_manager import block_hash

    code = "from ovis2.engine.block_manager import block_hash; print(block_hash(7, (1, 2, 3), ('abc',)))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {str(block_hash(7, (1, 2, 3), ("abc",)))}
    assert block_hash(None, (1, 2), ()) != block_hash(0, (1, 2), ())
    assert block_hash(None, (1, 2), ("a",)) != block_hash(None, (1, 2), ()) != block_hash(None, (2, 1), ())
    assert (
        2**64 < block_hash(None, (5,), ()) or block_hash(None, (6,), ()) > 2**64
    )  # 128 bits, not a 64-bit hash()


def test_a_cache_salt_keeps_whole_and_partial_hits_within_its_tenant():
    bm = BlockManager(num_blocks=20, block_size=4)

    def salted(ids, salt):
        seq = make_seq(ids)
        seq.request.inputs.cache_salt = salt
        return seq

    ids = [S, USER, N, 5, 6, 7, 8, 9, 10]
    admit(bm, salted(ids, "a"))
    assert len(bm.find_cached_blocks(salted(ids, "a"))) == 2
    assert bm.find_cached_blocks(salted(ids, "b")) == [] and bm.find_cached_blocks(make_seq(ids)) == []
    assert bm.find_partial_block(salted([S, USER, N, 1, 1], "a"), 0).num_tokens == 3
    assert bm.find_partial_block(salted([S, USER, N, 1, 1], "b"), 0) is None
    assert bm.find_partial_block(make_seq([S, USER, N, 1, 1]), 0) is None
