"""One step's budget of work (`max_num_batched_tokens`), handed out chunk by chunk by the scheduler.

A chunk's work is its tokens, the vision-tower crops its image atoms need and its prompt-logprob rows, each priced
in tokens (step_costs.py); a chunk is cut where its work would pass what is left. When not even its first token's
work fits, the sequence waits for a later step, unless no prompt chunk is in this step yet: then it runs anyway (a
crop dearer than the whole budget still runs, one a step) and ends the step's prefill; decodes still follow it.
"""

from __future__ import annotations

from collections.abc import Callable

from .sequence import Sequence, SequenceGroup
from .step_costs import StepCosts

# A step's budget where --max-num-batched-tokens is not given. On a CPU (1B shapes, 2 Zen 3 cores) a step of 4096
# held every running stream 16-20 s while a long prompt or an image prefilled; 2048 holds them 14 s on the prompt and
# 9 s on the image (one crop a step), the prefilling request taking no longer (bench/RESULTS.md).
DEFAULT_BATCHED_TOKENS = {"cuda": 4096, "cpu": 2048}

# (group, first atom, end atom) -> the vision-tower crops those image atoms still need
TowerCrops = Callable[[SequenceGroup, int, int], int]


class StepBudget:
    def __init__(self, limit: int, costs: StepCosts, tower_crops: TowerCrops | None) -> None:
        self.left = float(limit)
        self.costs, self.tower_crops = costs, tower_crops
        self.overran = False  # a chunk passed the budget: only decodes follow it
        self.prefilled = False  # a prompt chunk is in this step

    @property
    def is_open(self) -> bool:
        """More may run: what is left, or, past an overrun, decodes."""
        return self.left > 0 or self.overran

    def take(self, seq: Sequence, start: int, wanted: int) -> int:
        """How many of seq's next `wanted` (>= 1) tokens from `start` run this step (0: none), their work taken."""
        if wanted == 1 and not seq.is_prefilling:
            self.left -= 1.0  # a decode step
            return 1
        if self.left <= 0:  # past an overrun: decodes only
            return 0
        num_tokens = self._most_tokens(seq, start, wanted, self.left)
        if num_tokens == 0:
            if self.prefilled:
                return 0
            self.overran = True
            num_tokens = self._most_tokens(seq, start, wanted, self.left + self._work(seq, start, 1))
        self.prefilled = True
        self.left -= self._work(seq, start, num_tokens)
        return num_tokens

    def _most_tokens(self, seq: Sequence, start: int, wanted: int, limit: float) -> int:
        """The most tokens from `start` (at most `wanted`) whose work is within `limit` (work grows with them)."""
        high = min(wanted, int(limit))  # a token's work is at least 1
        if high <= 0 or self._work(seq, start, high) <= limit:
            return max(high, 0)
        low = 0  # fits; high does not
        while high - low > 1:
            middle = (low + high) // 2
            if self._work(seq, start, middle) <= limit:
                low = middle
            else:
                high = middle
        return low

    def _work(self, seq: Sequence, start: int, num_tokens: int) -> float:
        end = start + num_tokens
        work = float(num_tokens)
        if self.costs.prompt_logprob_row:
            work += len(seq.prompt_logprob_positions(start, end)) * self.costs.prompt_logprob_row
        if self.tower_crops is not None and self.costs.crop:
            first_atom, end_atom = seq.group.atoms_before(start), seq.group.atoms_before(end)
            if first_atom < end_atom:
                work += self.tower_crops(seq.group, first_atom, end_atom) * self.costs.crop
        return work
