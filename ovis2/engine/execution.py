"""Running one step's batch so that a request whose forward pass fails fails alone."""

from __future__ import annotations

import logging

import torch

from .scheduler import ScheduledSeq

logger = logging.getLogger(__name__)


def execute_isolating_failures(runner, items: list[ScheduledSeq], failed: dict[str, Exception]):
    """-> (the items that ran, [S, V] logits of those that sample, in order); adds each failed request to `failed`.

    If the batch fails, each request runs alone, so only the ones that fail by themselves fail. Rerunning is
    safe: a request's KV writes go to its own slots, and rewriting them gives the same values."""
    if not items:
        return [], None
    try:
        return items, runner.execute(items)
    except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, not the engine
        groups = list({id(item.seq.group): item.seq.group for item in items}.values())
        logger.exception("model step failed for a batch of %d requests", len(groups))
        if len(groups) == 1:
            failed[groups[0].request_id] = error
            return [], None
    ran: list[ScheduledSeq] = []
    rows: list[torch.Tensor] = []
    for group in groups:
        own = [item for item in items if item.seq.group is group]
        try:
            logits = runner.execute(own)
        except Exception as error:  # noqa: BLE001
            failed[group.request_id] = error
            continue
        ran += own
        if logits is not None:
            rows.append(logits)
    return ran, (torch.cat(rows) if rows else None)
