"""Decides, each step, how many tokens each sequence runs. Plain Python.

One rule instead of prefill/decode modes: a running sequence gets the tokens it still lacks (1 when
decoding, a chunk of its prompt while prefilling), within `max_num_batched_tokens` for the whole step
and `max_num_seqs` sequences; the budget counts a chunk's work, image crops and prompt-logprob rows priced in tokens
(step_budget.py). Running sequences go first (FCFS), so long prompts are prefilled in chunks while others keep
decoding; waiting sequences join the batch with the budget left over. When
the pool runs out of blocks the newest running sequence is preempted: its blocks are freed and it is
recomputed later (its cached prefix blocks usually survive). A request admitted on a partial prefix-cache
hit comes with a SlotCopy the runner applies before the step's forward.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .partial_blocks import SlotCopy
from .sequence import Sequence, SequenceGroup, SequenceStatus
from .step_budget import StepBudget, TowerCrops
from .step_costs import StepCosts


@dataclass
class ScheduledSeq:
    """seq runs its tokens [start, start + num_tokens) this step (fixed when scheduled)."""

    seq: Sequence
    num_tokens: int
    start: int = -1
    kv_copy: SlotCopy | None = None  # a partial prefix hit: slots to copy in before the forward

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.seq.num_computed_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's last token, so its logits give the next token."""
        return self.end >= self.seq.num_tokens

    @property
    def atoms(self) -> tuple[int, int]:
        """The image atoms this chunk prefills: atom indices [first, end) of the prompt's atoms."""
        group = self.seq.group
        if not group.atom_positions or self.start > group.atom_positions[-1]:
            return 0, 0  # past its images (every decode step)
        return group.atoms_before(self.start), group.atoms_before(self.end)

    @property
    def prompt_logprob_positions(self) -> range:
        """The positions of this chunk whose logits give prompt logprobs (the request asked for them)."""
        return self.seq.prompt_logprob_positions(self.start, self.end)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def kv_copies(self) -> list[SlotCopy]:
        """What the partial prefix hits of this step lend, to copy before running `scheduled`."""
        return [item.kv_copy for item in self.scheduled if item.kv_copy is not None]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        costs: StepCosts = StepCosts(),
        tower_crops: TowerCrops | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.costs = costs
        self.tower_crops = tower_crops
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._groups: set[SequenceGroup] = set()  # each held sequence's group: sequences hold theirs weakly

    # --- derived state
    @property
    def num_waiting(self) -> int:
        """Requests with a sequence waiting (a request's n choices count once)."""
        return _num_requests(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests with a sequence running."""
        return _num_requests(self.running)

    # --- requests in and out
    def add(self, group: SequenceGroup) -> None:
        self.waiting.extend(group.seqs)
        self._groups.add(group)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and return its blocks."""
        group = seq.group
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if group.is_finished:
            self._groups.discard(group)

    # --- the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = StepBudget(self.max_num_batched_tokens, self.costs, self.tower_crops)
        self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: StepBudget) -> None:
        index = 0
        while index < len(self.running) and budget.is_open:
            seq = self.running[index]
            num_tokens = budget.take(seq, seq.num_computed_tokens, seq.num_uncomputed_tokens)
            if num_tokens == 0:  # its next chunk does not fit what is left: a later step
                index += 1
                continue
            if not self._make_room(seq, num_tokens, out):
                break  # seq itself was preempted: it was the newest, nothing after it remains
            self.block_manager.append_slots(seq, num_tokens)
            out.scheduled.append(ScheduledSeq(seq, num_tokens))
            index += 1

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until seq's new tokens fit; False if seq was preempted."""
        while not self.block_manager.can_append(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _schedule_waiting(self, out: SchedulerOutput, budget: StepBudget) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget.left > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            parent = self._fork_parent(seq)
            # waits for its first choice's prompt, then shares it (so the first choice's prompt logprobs, if asked
            # for, come before any choice's tokens: a first choice preempted while prefilling is ahead in the queue)
            if parent is not None and parent.is_prefilling:
                skipped.append(self.waiting.popleft())
                continue
            admitted = self._admit(seq, parent, budget, out)
            if admitted is None:
                break
            # its first chunk's work does not fit what is left: after the others, or a later step
            if not admitted:
                skipped.append(self.waiting.popleft())
        self.waiting.extendleft(reversed(skipped))

    def _admit(
        self, seq: Sequence, parent: Sequence | None, budget: StepBudget, out: SchedulerOutput
    ) -> bool | None:
        """Whether seq's first chunk is scheduled (False: none of it fits the budget); None when the pool has no
        room for it."""
        bm = self.block_manager
        if parent is not None and parent.status is SequenceStatus.RUNNING:
            shared = bm.num_shared_blocks(parent, seq)
            # a parent whose own lent slots are copied in this step has not got them yet: nothing to lend
            borrowing = any(item.seq is parent and item.kv_copy is not None for item in out.scheduled)
            partial = None if borrowing else bm.fork_partial_block(parent, seq, shared)
            lent = partial.num_tokens if partial else 0
            start = shared * bm.block_size + lent
            num_tokens = budget.take(seq, start, seq.num_tokens - start)
            if num_tokens == 0:
                return False
            if not bm.can_allocate(seq, parent.block_table[:shared], lent + num_tokens):
                return None
            bm.fork(parent, seq, partial)
        else:
            # prompt logprobs: every prompt position must run, the prefix cache keeps no logits
            uncached = seq.needs_prompt_logprobs
            cached = [] if uncached else bm.find_cached_blocks(seq)
            partial = None if uncached else bm.find_partial_block(seq, len(cached))
            lent = partial.num_tokens if partial else 0
            start = len(cached) * bm.block_size + lent
            num_tokens = budget.take(seq, start, seq.num_tokens - start)
            if num_tokens == 0:
                return False
            if not bm.can_allocate(seq, cached, lent + num_tokens):
                return None
            bm.allocate(seq, cached, partial)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        bm.append_slots(seq, num_tokens)
        copy = None
        if partial is not None:
            target = seq.block_table[seq.num_computed_tokens // bm.block_size]
            copy = SlotCopy(partial.block_id, target, partial.num_tokens)
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        out.scheduled.append(ScheduledSeq(seq, num_tokens, kv_copy=copy))
        return True

    @staticmethod
    def _fork_parent(seq: Sequence) -> Sequence | None:
        """The first unfinished choice of the request, when seq is a later choice (n > 1)."""
        if seq.index == 0:
            return None
        first = seq.group.seqs[0]
        if first.is_finished or first.status is SequenceStatus.WAITING:
            return None
        return first

    # --- after the model ran
    def update_computed(self, items: list[ScheduledSeq]) -> None:
        """The KV of these items' tokens is now in the cache (items that failed are left out)."""
        for item in items:
            item.seq.num_computed_tokens += item.num_tokens
            self.block_manager.commit_computed(item.seq)


def _num_requests(seqs) -> int:
    """The requests among `seqs`. Read from the event loop (metrics, the overload check) while the engine thread
    changes the queues: a deque changed while it is read raises, and is read again."""
    for _ in range(100):
        try:
            return len({id(seq.group) for seq in seqs})
        except RuntimeError:
            continue
    return len(seqs)  # still changing: its sequences, an upper bound
