"""A request (SequenceGroup) and its choices (Sequence): the state the scheduler and runner share.

Plain Python: no torch here, so the scheduler and block manager stay unit-testable in microseconds.
Image embeddings and per-choice random generators are attached by the core as opaque objects.
"""

from __future__ import annotations

import enum
import weakref
from typing import Any

from ..inputs import EngineInputs
from .outputs import RequestMetrics
from .request import EngineRequest
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One choice of a request: prompt + generated tokens, its block table and its progress.

    It holds its EngineRequest, but its SequenceGroup only weakly, so no reference cycle keeps a finished request
    alive: reference counting frees its pixels and token lists the moment the core lets go. (In a cycle they
    waited for the collector's rare full pass: ~300 MB of pixels after a burst of 128 image requests on the demo
    model.) The scheduler holds the group of every sequence it holds; the core holds them through a step."""

    def __init__(self, group: SequenceGroup, index: int) -> None:
        self.request = group.request
        self._group = weakref.ref(group)
        self.index = index
        self.token_ids: list[int] = list(group.prompt_token_ids)
        self._output_ids: list[
            int
        ] = []  # the generated tail of token_ids, kept apart so reading it copies nothing
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache (first admission)
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.hash_chain: list[int] = []  # prefix-cache hash of each full block by content (tokens only grow)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.generator: Any = None  # torch.Generator for sampled choices, created by the core
        self.matcher: Any = None  # structured outputs: the grammar matcher, fed every output token (survives
        # preemption as it is: it has accepted exactly the output tokens, which recompute keeps)
        self.num_preemptions = 0

    # --- derived state
    @property
    def group(self) -> SequenceGroup:
        group = self._group()
        assert group is not None, "a Sequence outlived its SequenceGroup"
        return group

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_len(self) -> int:
        return len(self.request.inputs.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens: the sequence's own list, which grows (copy it to keep a snapshot)."""
        return self._output_ids

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until the KV of every prompt (and, after a preemption, every earlier output) token exists."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request asked for prompt logprobs and this choice computes them: the first, until its first token."""
        return self.index == 0 and self.params.prompt_logprobs is not None and not self._output_ids

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """The positions in [start, end) whose logits give a prompt token's logprob not yet computed (position p
        gives token p + 1's; those computed before a preemption are not computed again)."""
        if not self.needs_prompt_logprobs:
            return range(0)
        return range(max(start, self.group.num_prompt_logprobs), min(end, self.prompt_len - 1))

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self._output_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted: every block is gone; recompute prompt + outputs when scheduled again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_hashed_blocks = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, {self.num_computed_tokens}/{self.num_tokens})"
        )


class SequenceGroup:
    """One request in the core: its EngineRequest and its n choices."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.metrics = RequestMetrics(arrival_time=request.arrival_time)
        # visual_embeddings.RequestEmbeddings while some choice still prefills image atoms; else None
        self.image_embeds: Any = None
        # prompt logprobs asked for: those of prompt tokens 1, 2, ... computed so far (the core's raw entries)
        self.prompt_logprobs: list[Any] | None = [] if request.params.prompt_logprobs is not None else None
        self.seqs = [Sequence(self, i) for i in range(request.params.n)]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def inputs(self) -> EngineInputs:
        return self.request.inputs

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def atom_positions(self) -> list[int]:
        return self.request.atom_positions

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.inputs.prompt_token_ids

    @property
    def prompt_len(self) -> int:
        return len(self.inputs.prompt_token_ids)

    @property
    def num_atoms(self) -> int:
        return len(self.atom_positions)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def num_prompt_logprobs(self) -> int:
        return len(self.prompt_logprobs or ())

    @property
    def needs_image_embeds(self) -> bool:
        """Some unfinished choice still has image atoms left to prefill."""
        if not self.atom_positions:
            return False
        last_atom = self.atom_positions[-1]
        return any(not s.is_finished and s.num_computed_tokens <= last_atom for s in self.seqs)

    def atoms_before(self, position: int) -> int:
        return self.request.atoms_before(position)

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id}, n={len(self.seqs)})"
