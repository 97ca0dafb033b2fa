"""The engine core: token ids in, token ids out. It knows no tokenizer and no text.

`step()` reads schedule -> encode the image crops the chunks reach -> execute -> update from output. A request
that fails (its images, its forward pass, its sampling, a test's fault hook) comes back in `CoreStepOutput.failed`
and is finished here; the others in the batch go on (execution.py). The scheduler output is never edited: failed
requests are skipped by id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..errors import Ovis2Error, StructuredOutputError
from ..image_layout import check_tokens_per_crop
from .block_manager import BlockManager
from .context_length import check_pool_blocks, max_model_len
from .core_outputs import CoreStepOutput, RequestFailure, RequestUpdate, TokenUpdate
from .engine_args import EngineArgs
from .engine_stats import EngineStats
from .execution import execute_isolating_failures, groups_of, sample_isolating_failures
from .model_loading import load_model
from .model_runner import ModelRunner
from .request import EngineRequest
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence, SequenceGroup
from .step_budget import DEFAULT_BATCHED_TOKENS
from .step_costs import step_costs
from .structured.grammar import too_slow_to_follow

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, args: EngineArgs, model=None) -> None:
        self.args = args
        self.model = model if model is not None else load_model(args)
        check_tokens_per_crop(self.model.config.vision_config)
        self.runner = ModelRunner(self.model, args)
        check_pool_blocks(self.runner.num_blocks, args.block_size, self.runner.device)
        self.runner.allocate_kv_cache()
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            args.max_num_seqs,
            args.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS.get(self.runner.device.type, 4096),
            step_costs(self.model.config),
            self.runner.visual.crops_to_encode,
        )
        self.groups: dict[str, SequenceGroup] = {}
        self.max_model_len = max_model_len(
            args.max_model_len,
            self.model.config.text_config.max_position_embeddings,
            self.runner.num_blocks * args.block_size,
            self.runner.device,
        )
        if self.runner.device.type == "cuda" and not args.enforce_eager:
            self.runner.enable_decode_graphs(self.max_model_len, capture=True)
        self.request_hook: Callable[[SequenceGroup], None] | None = (
            None  # tests inject per-request faults here
        )
        self.seed_generator = torch.Generator().manual_seed(args.seed)
        self.counters = dict.fromkeys(
            ("num_prompt_tokens", "num_cached_tokens", "num_generated_tokens", "num_preemptions"), 0
        )

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # --- requests in and out
    def add_request(self, request: EngineRequest) -> SequenceGroup:
        if request.request_id in self.groups:
            raise Ovis2Error(f"request id {request.request_id!r} is already running")
        group = SequenceGroup(request)
        for seq in group.seqs:
            seq.generator = self._generator_for(seq)
            if request.grammar is not None:  # one matcher per choice; it ends on the request's stop tokens
                seq.matcher = request.grammar.matcher(request.params.stopping_token_ids)
        self.groups[request.request_id] = group
        self.scheduler.add(group)
        return group

    def _generator_for(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.is_greedy:
            return None
        seed = seq.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.seed_generator))
        return torch.Generator(device=self.runner.device).manual_seed(seed + seq.index)

    def abort_request(self, request_id: str) -> SequenceGroup | None:
        """Stop a request now and free its blocks; the request, or None if it is not here (finished, unknown)."""
        group = self.groups.pop(request_id, None)
        if group is not None:
            self._finish_all(group, "abort")
        return group

    def finish_choice(self, request_id: str, index: int, reason: str = "stop") -> None:
        """Output processing found a stop string: that choice ends here and gives back its blocks."""
        group = self.groups.get(request_id)
        if group is None or group.seqs[index].is_finished:
            return
        self._finish_seq(group.seqs[index], reason)
        if group.is_finished:
            self._retire(group)

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason

    def _finish_all(self, group: SequenceGroup, reason: str) -> None:
        for seq in group.seqs:
            if not seq.is_finished:
                self._finish_seq(seq, reason)
        group.image_embeds = None
        group.metrics.finished_time = time.monotonic()

    def _retire(self, group: SequenceGroup) -> None:
        self.groups.pop(group.request_id, None)
        group.image_embeds = None
        group.metrics.finished_time = time.monotonic()
        self.counters["num_cached_tokens"] += group.seqs[0].num_cached_tokens

    # --- the step
    def step(self) -> CoreStepOutput:
        sched = self.scheduler.schedule()
        self.counters["num_preemptions"] += len(sched.preempted)
        if sched.is_empty:
            return CoreStepOutput()
        groups = groups_of(sched.scheduled)  # alive through the step, which may retire some of them
        failed = self._copy_lent_slots(sched.scheduled)
        self._prepare_requests(groups, sched.scheduled, failed)
        items = [item for item in sched.scheduled if item.seq.group.request_id not in failed]
        items, logits = execute_isolating_failures(self.runner, items, failed)
        self.scheduler.update_computed(items)
        for item in items:
            if id(item) in logits.prompt_logprobs:
                item.seq.group.prompt_logprobs.extend(logits.prompt_logprobs[id(item)])
        return self._update_from_output(items, logits.sampled, failed)

    def _copy_lent_slots(self, items: list[ScheduledSeq]) -> dict[str, Exception]:
        """The KV that partial prefix hits borrow, copied once before any forward (a rerun after a failed batch
        must not copy again); if the copy fails, the borrowers fail."""
        borrowers = [item for item in items if item.kv_copy is not None]
        try:
            self.runner.copy_kv_slots([item.kv_copy for item in borrowers])
        except Exception as error:  # noqa: BLE001 - a failed copy fails its borrowers, not the engine
            logger.exception("copying %d lent prefix slots failed", len(borrowers))
            return {item.seq.group.request_id: error for item in borrowers}
        return {}

    def _prepare_requests(
        self, groups: list[SequenceGroup], items: list[ScheduledSeq], failed: dict[str, Exception]
    ) -> None:
        """The fault hook of each request, then the image crops its chunk reaches; a failure (into `failed`)
        fails that request only."""
        now = time.monotonic()
        for group in [g for g in groups if g.request_id not in failed]:
            group.metrics.first_scheduled_time = group.metrics.first_scheduled_time or now
            try:
                if self.request_hook is not None:
                    self.request_hook(group)
            except Exception as error:  # noqa: BLE001 - a broken request fails alone
                failed[group.request_id] = error
        alive = [item for item in items if item.seq.group.request_id not in failed]
        failed.update(self.runner.visual.prepare([(item.seq.group, *item.atoms) for item in alive]))

    def _update_from_output(
        self, items: list[ScheduledSeq], logits, failed: dict[str, Exception]
    ) -> CoreStepOutput:
        self._count_prompt_tokens(items)
        updates: dict[str, RequestUpdate] = {}
        try:
            self._append_sampled(items, logits, updates, failed)
        except Exception as error:  # noqa: BLE001 - a failed sampling step fails its requests, not the engine
            logger.exception("sampling step failed")
            failed.update({group.request_id: error for group in groups_of(items)})
        for group in groups_of(items):
            if group.image_embeds is not None and not group.needs_image_embeds:
                group.image_embeds = None  # every choice is past its images: drop them (the LRU keeps a copy)
        return CoreStepOutput(
            updates=[update for rid, update in updates.items() if rid not in failed],
            failed={rid: self._fail(rid, error) for rid, error in failed.items()},
        )

    def _append_sampled(
        self,
        items: list[ScheduledSeq],
        logits,
        updates: dict[str, RequestUpdate],
        failed: dict[str, Exception],
    ) -> None:
        sampled = [item for item in items if item.samples]
        if not sampled:
            return
        now = time.monotonic()
        for item, token_id, logprob in sample_isolating_failures(sampled, logits, failed):
            seq, group = item.seq, item.seq.group
            if seq.matcher is not None and not seq.matcher.accept(token_id):
                failed[group.request_id] = seq.matcher.refusal(token_id)
                continue
            group.metrics.first_token_time = group.metrics.first_token_time or now
            update = updates.get(group.request_id)
            if update is None:
                update = updates[group.request_id] = RequestUpdate(
                    group.request_id, [], group.seqs[0].num_cached_tokens, group.metrics
                )
            if seq.needs_prompt_logprobs:  # its first token: they are all computed, and go out with it
                # never seen; if it were, the request fails, not the batch
                if group.num_prompt_logprobs != seq.prompt_len - 1:
                    failed[group.request_id] = RuntimeError("prompt logprobs missing")
                    continue
                update.prompt_logprobs, group.prompt_logprobs = [None, *group.prompt_logprobs], None
            try:
                update.tokens.append(self._append_token(seq, token_id, logprob))
            except Exception as error:  # noqa: BLE001 - a request whose token cannot be taken fails alone
                logger.exception("request %s: taking its token failed", group.request_id)
                failed[group.request_id] = error
        matchers = [
            (item.seq.group.request_id, item.seq.matcher) for item in sampled if item.seq.matcher is not None
        ]
        for request_id, error in too_slow_to_follow(
            matchers, self.args.max_grammar_seconds_per_token
        ).items():
            failed.setdefault(request_id, error)
        for update in updates.values():
            group = self.groups.get(update.request_id)
            if group is not None and group.is_finished:
                self._retire(group)

    def _append_token(self, seq: Sequence, token_id: int, logprob) -> TokenUpdate:
        seq.append_token(token_id)
        self.counters["num_generated_tokens"] += 1
        reason = self._stop_reason(seq, token_id)
        if reason is not None:
            self._finish_seq(seq, reason)
        return TokenUpdate(seq.index, token_id, logprob, reason)

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if token_id in params.stopping_token_ids and seq.num_output_tokens > params.min_tokens:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _count_prompt_tokens(self, items: list[ScheduledSeq]) -> None:
        for item in items:
            if item.start < item.seq.prompt_len:
                self.counters["num_prompt_tokens"] += min(item.end, item.seq.prompt_len) - item.start

    def _fail(self, request_id: str, error: Exception) -> RequestFailure:
        logger.warning("request %s failed: %s", request_id, error)
        group = self.groups.pop(request_id, None)
        if group is not None:
            self._finish_all(group, "error")
        cached = group.seqs[0].num_cached_tokens if group is not None else 0
        # the request's own fault: its constraint reached a dead end; anything else failing in a step is the engine's
        if isinstance(error, StructuredOutputError):
            return RequestFailure(str(error), cached, user_error=True)
        return RequestFailure(f"{type(error).__name__}: {error}", cached)

    # --- introspection
    @property
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            kv_cache_usage=bm.usage,
            num_encoded_images=self.runner.visual.num_encoded_images,
            **self.counters,
        )
