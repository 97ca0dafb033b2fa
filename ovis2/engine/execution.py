"""Running one step's forward pass and sampling its logits so that a request whose part fails fails alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .model_runner import StepLogits
from .sampler import SamplingRow, sample
from .scheduler import ScheduledSeq
from .sequence import SequenceGroup

logger = logging.getLogger(__name__)


def groups_of(items: list[ScheduledSeq]) -> list[SequenceGroup]:
    """The requests of these items, in order of first appearance."""
    return list({id(item.seq.group): item.seq.group for item in items}.values())


def execute_isolating_failures(
    runner, items: list[ScheduledSeq], failed: dict[str, Exception]
) -> tuple[list[ScheduledSeq], StepLogits]:
    """-> (the items that ran, their logits: [S, V] of those that sample, in order, and their prompt logprobs);
    adds each failed request to `failed`.

    Rerunning a request alone is safe: its KV writes go to its own slots, and rewriting them gives the same
    values."""
    if not items:
        return [], StepLogits(None, {})
    runs = run_isolating_failures(items, runner.execute, failed, "model step")
    ran = [item for own, _ in runs for item in own]
    rows = [result.sampled for _, result in runs if result.sampled is not None]
    found = {key: values for _, result in runs for key, values in result.prompt_logprobs.items()}
    return ran, StepLogits(torch.cat(rows) if rows else None, found)


def sample_isolating_failures(
    sampled: list[ScheduledSeq], logits: torch.Tensor, failed: dict[str, Exception]
) -> list[tuple]:
    """(item, token id, logprob) for each sampled item (logits: one row each, in order) whose request's rows
    sample; adds each request whose rows fail to `failed`. A request sampled again alone draws as it would have
    in the batch: its generators are rewound, and its logits are the unmasked ones."""
    rows = {
        id(i): SamplingRow(
            i.seq.params, i.seq.group.prompt_token_ids, i.seq.output_token_ids, i.seq.generator, i.seq.matcher
        )
        for i in sampled
    }
    position = {id(item): k for k, item in enumerate(sampled)}
    constrained = any(row.matcher is not None for row in rows.values())  # sample masks their logits in place
    generators = {id(r.generator): r.generator for r in rows.values() if r.generator is not None}.values()
    states = [(generator, generator.get_state()) for generator in generators]

    def run(own: list[ScheduledSeq]):
        if len(own) < len(sampled):  # a request alone: its rows, a copy
            own_logits = logits[[position[id(item)] for item in own]]
        else:
            own_logits = logits.clone() if constrained else logits
        return sample(own_logits, [rows[id(item)] for item in own])

    def rewind() -> None:  # the failed batch may have drawn
        for generator, state in states:
            generator.set_state(state)

    runs = run_isolating_failures(sampled, run, failed, "sampling", before_retry=rewind)
    return [
        chosen for own, result in runs for chosen in zip(own, result.token_ids, result.logprobs, strict=True)
    ]


def run_isolating_failures(
    items: list[ScheduledSeq],
    run: Callable[[list[ScheduledSeq]], Any],
    failed: dict[str, Exception],
    what: str,
    before_retry: Callable[[], None] | None = None,
) -> list[tuple[list[ScheduledSeq], Any]]:
    """[(items, run(items))]; if that fails, [(a request's items, run(them))] for each request that runs alone
    (`before_retry` first), so only the ones that fail by themselves fail; each failed request added to
    `failed`."""
    try:
        return [(items, run(items))]
    except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, not the engine
        groups = groups_of(items)
        logger.exception("%s failed for a batch of %d requests", what, len(groups))
        if len(groups) == 1:
            failed[groups[0].request_id] = error
            return []
    if before_retry is not None:
        before_retry()
    runs = []
    for group in groups:
        own = [item for item in items if item.seq.group is group]
        try:
            runs.append((own, run(own)))
        except Exception as error:  # noqa: BLE001
            failed[group.request_id] = error
    return runs
