from ovis2.engine.block_manager import BlockManager
from ovis2.engine.partial_blocks import SlotCopy
from ovis2.engine.request import EngineRequest
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.scheduler import Scheduler
from ovis2.engine.sequence import SequenceGroup
from ovis2.inputs import EngineInputs
from ovis2.tokenizer import IM_END_ID, IM_START_ID, NEWLINE_ID


def group(request_id, length, n=1):
    first = 1000 * (sum(map(ord, request_id)) % 50)  # distinct prompts: no accidental prefix hits
    return SequenceGroup(
        EngineRequest.build(
            request_id, EngineInputs(list(range(first + 1, first + length + 1))), SamplingParams(n=n)
        )
    )


def fake_step(scheduler: Scheduler):
    """Schedule, mark the tokens computed, append a token to every sequence that sampled."""
    out = scheduler.schedule()
    out.summary = [(i.seq.group.request_id, i.num_tokens, i.samples) for i in out.scheduled]
    scheduler.update_computed(out.scheduled)
    for item in out.scheduled:
        if item.samples:
            item.seq.append_token(7)
    return out


def test_running_decode_first_then_new_requests_fill_the_budget():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(group("a", 6))
    out = fake_step(sched)
    assert [(i.seq.group.request_id, i.num_tokens) for i in out.scheduled] == [("a", 6)]
    sched.add(group("b", 20))
    out = fake_step(sched)
    assert [(i.seq.group.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1), ("b", 9)]
    out = fake_step(sched)  # b keeps prefilling in chunks while a decodes
    assert out.summary == [("a", 1, True), ("b", 9, False)]
    out = fake_step(sched)
    assert out.summary == [("a", 1, True), ("b", 2, True)]


def test_max_num_seqs_limits_the_batch():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for name in "abc":
        sched.add(group(name, 3))
    out = fake_step(sched)
    assert len(out.scheduled) == 2 and sched.num_waiting == 1


def test_running_and_waiting_count_requests_not_their_choices():
    """The metrics and --max-waiting-requests count requests: n=4 is one request however its choices are placed."""
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    sched.add(group("four", 3, n=4))
    sched.add(group("one", 3))
    assert (sched.num_running, sched.num_waiting) == (0, 2)
    fake_step(sched)  # the first choice prefills beside the other request; three choices wait to fork from it
    assert len(sched.running) == 2 and len(sched.waiting) == 3
    assert (sched.num_running, sched.num_waiting) == (2, 1)


def test_out_of_blocks_preempts_the_newest_and_resumes_it_later():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(group("old", 7))
    sched.add(group("new", 8))
    fake_step(sched)  # old: 2 blocks, new: 2 blocks; pool full
    out = fake_step(sched)  # old needs a 3rd block for token 8
    assert [s.group.request_id for s in out.preempted] == ["new"]
    assert [i.seq.group.request_id for i in out.scheduled] == ["old"]
    assert sched.waiting[0].group.request_id == "new" and sched.waiting[0].num_computed_tokens == 0
    old = sched.running[0]
    sched.finish(old)
    out = fake_step(sched)
    # its 8 prompt tokens + 1 output: the two full blocks are still cached, the last token is recomputed
    assert [(i.seq.group.request_id, i.num_tokens) for i in out.scheduled] == [("new", 1)]


def test_preempted_without_prefix_cache_recomputes_prompt_and_outputs():
    sched = Scheduler(
        BlockManager(4, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100
    )
    sched.add(group("old", 7))
    sched.add(group("new", 8))
    fake_step(sched)
    fake_step(sched)
    sched.finish(sched.running[0])
    out = fake_step(sched)
    assert [(i.seq.group.request_id, i.num_tokens) for i in out.scheduled] == [("new", 9)]


def test_fcfs_a_big_request_is_not_overtaken():
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(group("a", 16))
    sched.add(group("big", 20))
    sched.add(group("small", 2))
    out = fake_step(sched)
    assert [i.seq.group.request_id for i in out.scheduled] == ["a"]


def test_later_choices_wait_for_the_first_then_share_its_prompt():
    bm = BlockManager(50, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    g = group("n3", 10, n=3)
    sched.add(g)
    out = fake_step(sched)
    assert [i.seq.index for i in out.scheduled] == [0]
    out = fake_step(sched)
    # each later choice shares the two whole blocks, copies the first's slot of position 8 and computes position 9
    assert [(i.seq.index, i.num_tokens) for i in out.scheduled] == [(0, 1), (1, 1), (2, 1)]
    assert g.seqs[1].block_table[:2] == g.seqs[0].block_table[:2]
    first_third_block = g.seqs[0].block_table[2]
    assert [c for c in out.kv_copies] == [
        SlotCopy(first_third_block, g.seqs[k].block_table[2], 1) for k in (1, 2)
    ]
    for seq in list(sched.running):
        sched.finish(seq)
    assert bm.num_free_blocks == 50


def test_a_preempted_choice_resumes_without_its_siblings_output_blocks():
    bm = BlockManager(9, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    other = group("b", 8)
    sched.add(other)
    g = group("n2", 6, n=2)
    sched.add(g)
    parent, child = g.seqs
    preempted = False
    for step in range(14):
        out = sched.schedule()
        if (
            child in out.preempted
        ):  # the pool ran out; once "b" is done, the child comes back while its parent runs
            preempted = True
            sched.finish(other.seqs[0])
        sched.update_computed(out.scheduled)
        for item in out.scheduled:
            if item.samples:
                item.seq.append_token(
                    100 * (item.seq.index + 1) + step
                )  # the two choices write different tokens
        for index, block in enumerate(child.block_table[: child.num_computed_tokens // 4]):
            if block in parent.block_table:  # a block both hold must hold the same tokens for both
                assert (
                    child.token_ids[index * 4 : index * 4 + 4] == parent.token_ids[index * 4 : index * 4 + 4]
                )
    assert preempted and child.num_preemptions == 1 and child.status.value == "running"


def test_a_request_waiting_for_blocks_is_hashed_once(monkeypatch):
    from ovis2.engine import block_manager

    hashed = []  # the first token of every block hashed
    real_hash = block_manager.block_hash
    monkeypatch.setattr(
        block_manager,
        "block_hash",
        lambda prev, ids, *rest: hashed.append(ids[0]) or real_hash(prev, ids, *rest),
    )
    sched = Scheduler(BlockManager(12, 4), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(group("a", 36))  # 9 of the 12 blocks, then a decode block
    fake_step(sched)
    b = group("b", 40)  # needs 10 blocks: waits while a runs
    sched.add(b)
    for _ in range(5):
        out = fake_step(sched)
        assert [i.seq.group.request_id for i in out.scheduled] == ["a"]
    b_blocks = [first for first in hashed if first in b.prompt_token_ids]
    assert b_blocks == [b.prompt_token_ids[0]]  # looked up once (a miss), not once per step


def text_group(request_id, ids):
    return SequenceGroup(EngineRequest.build(request_id, EngineInputs(list(ids)), SamplingParams()))


S, E, N = IM_START_ID, IM_END_ID, NEWLINE_ID


def test_a_partial_prefix_hit_starts_mid_block_with_a_copy_into_its_own_block():
    bm = BlockManager(20, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    first = text_group("first", [1, 2, 3, 4, E, N, 7, 8, 9])
    sched.add(first)
    assert fake_step(sched).kv_copies == []
    second = text_group("second", [1, 2, 3, 4, E, N, 70, 80, 90, 100])
    sched.add(second)
    out = fake_step(sched)
    item = next(i for i in out.scheduled if i.seq.group is second)
    seq = second.seqs[0]
    assert (item.start, item.num_tokens, seq.num_cached_tokens) == (6, 4, 6)
    assert seq.block_table[0] == first.seqs[0].block_table[0] and len(seq.block_table) == 3
    assert item.kv_copy == SlotCopy(first.seqs[0].block_table[1], seq.block_table[1], 2)
    assert out.kv_copies == [item.kv_copy]


def test_a_partial_hit_that_does_not_fit_the_pool_changes_nothing():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(text_group("first", [1, 2, 3, 4, E, N, 7, 8, 9]))
    fake_step(sched)  # 3 blocks
    sched.add(text_group("second", [1, 2, 3, 4, E, N, 70, 80, 90, 100]))  # needs 2 more: 1 free
    out = fake_step(sched)
    assert [i.seq.group.request_id for i in out.scheduled] == ["first"] and out.kv_copies == []
    assert sched.waiting[0].num_computed_tokens == 0 and sched.waiting[0].block_table == []


def test_request_counts_read_again_when_the_engine_thread_changes_the_queue_meanwhile():
    from ovis2.engine.scheduler import _num_requests

    class ChangedWhileRead(list):  # as a deque the engine thread appends to raises in the reading thread
        reads = 0

        def __iter__(self):
            ChangedWhileRead.reads += 1
            if ChangedWhileRead.reads == 1:
                raise RuntimeError("deque mutated during iteration")
            return super().__iter__()

    groups = [group("four", 3, n=4), group("one", 3)]  # held: a sequence holds its group weakly
    seqs = groups[0].seqs + groups[1].seqs
    assert _num_requests(ChangedWhileRead(seqs)) == 2 and ChangedWhileRead.reads == 2
