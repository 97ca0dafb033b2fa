"""The scheduler and block manager against a model of the KV pool, over random runs.

Each slot holds a label: the token prefix whose last token's KV it stores. Lent slots are copied as the core
copies them (once, before the step), a failing batch writes garbage into every slot it was to write before its
requests are rerun or failed, and every context slot a running sequence reads must hold the label of its own
prefix. Preemption, n=2 choices, chunked budgets and partial prefix hits all happen along the way.
"""

import random

import pytest

from ovis2.engine.block_manager import BlockManager
from ovis2.engine.block_tables import slot_of
from ovis2.engine.request import EngineRequest
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.scheduler import Scheduler
from ovis2.engine.sequence import SequenceGroup
from ovis2.inputs import EngineInputs
from ovis2.tokenizer import IM_END_ID, IM_START_ID, NEWLINE_ID

S, E, N = IM_START_ID, IM_END_ID, NEWLINE_ID
PREFIXES = ([S, 8, N, 5, E, N, S, 9, N], [S, 8, N, 5, E, N], [S, 9, N, E, N, 7, 7])
ALPHABET = (1, 2, E, N)


def random_group(rng: random.Random, name: str, max_len: int) -> SequenceGroup:
    ids = list(rng.choice(PREFIXES)) + [rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))]
    params = SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=8)
    return SequenceGroup(EngineRequest.build(name, EngineInputs(ids[:max_len]), params))


def check_pool(bm: BlockManager, groups: list[SequenceGroup], kv: dict, block_size: int) -> None:
    refs = [0] * bm.num_total_blocks
    for group in groups:
        for seq in group.seqs:
            for block in seq.block_table:
                refs[block] += 1
    assert refs == bm.ref_counts
    assert set(bm.free_blocks) == {b for b, count in enumerate(refs) if count == 0}
    assert sum(map(len, bm.partials.children.values())) == len(bm.partials.parent_of)
    for parent, siblings in bm.partials.children.items():
        for block, tokens in siblings.items():
            assert bm.partials.parent_of[block] == parent and bm.block_hash_of[block] is not None
            for offset in range(block_size):  # a listed block's KV is its tokens'
                assert kv[block * block_size + offset][-(offset + 1) :] == tokens[: offset + 1]


def run(seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    bs, num_blocks = rng.choice([2, 4]), rng.randint(6, 30)
    bm = BlockManager(num_blocks, bs)
    sched = Scheduler(bm, max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(3, 20))
    kv: dict[int, tuple | str] = {}
    groups: list[SequenceGroup] = []
    copies = preemptions = 0
    for step in range(120):
        if rng.random() < 0.4 and len(groups) < 12:
            groups.append(random_group(rng, f"r{step}", num_blocks * bs // 3))
            sched.add(groups[-1])
        out = sched.schedule()
        copies += len(out.kv_copies)
        preemptions += len(out.preempted)
        lent = [[kv.get(c.source * bs + i) for i in range(c.num_slots)] for c in out.kv_copies]
        for copy, labels in zip(out.kv_copies, lent, strict=True):
            for offset, label in enumerate(labels):
                kv[copy.target * bs + offset] = label
        failed = set()
        if out.scheduled and rng.random() < 0.2:  # the batch fails after writing garbage, then reruns
            for item in out.scheduled:
                for position in range(item.start, item.end):
                    kv[slot_of(item.seq.block_table, position, bs)] = "garbage"
                if rng.random() < 0.3:
                    failed.add(id(item.seq.group))
        ran = [item for item in out.scheduled if id(item.seq.group) not in failed]
        for item in ran:
            seq = item.seq
            for position in range(item.start):
                assert kv.get(slot_of(seq.block_table, position, bs)) == tuple(seq.token_ids[: position + 1])
            for position in range(item.start, item.end):
                kv[slot_of(seq.block_table, position, bs)] = tuple(seq.token_ids[: position + 1])
        sched.update_computed(ran)
        for group in groups:
            if id(group) in failed:
                for seq in group.seqs:
                    if not seq.is_finished:
                        sched.finish(seq)
        for item in ran:
            if item.samples and not item.seq.is_finished:
                item.seq.append_token(rng.choice(ALPHABET))
                if item.seq.num_output_tokens >= 6 or rng.random() < 0.1:
                    sched.finish(item.seq)
        check_pool(bm, groups, kv, bs)
    return copies, preemptions


@pytest.mark.parametrize("first_seed", range(0, 200, 50))
def test_every_slot_a_sequence_reads_holds_its_own_prefix(first_seed):
    totals = [run(seed) for seed in range(first_seed, first_seed + 50)]
    assert sum(c for c, _ in totals) > 50 and sum(p for _, p in totals) > 5  # the paths under test were taken
