"""The synchronous engine: add_request / step / abort_request. Each step reads schedule -> run -> postprocess."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import Ovis2Error
from ..tokenizer import IMAGE_ATOM_ID
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .engine_args import EngineArgs
from .inputs import TOKENS_PER_CROP, EngineInputs, crop_count
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .sampler import SamplingRow, sample
from .sampling_params import SamplingParams
from .scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceGroup

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float  # 0..1, blocks referenced by some sequence
    num_encoded_images: int = 0
    num_prompt_tokens: int = 0  # computed (not cached) prompt tokens so far
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache so far
    num_generated_tokens: int = 0
    num_preemptions: int = 0


def load_model(args: EngineArgs):
    from ..modeling import Ovis2ForConditionalGeneration
    from ..weights import resolve_checkpoint

    path = resolve_checkpoint(args.model)
    return Ovis2ForConditionalGeneration.from_pretrained(str(path), dtype=args.dtype, device=args.device,
                                                         compat=args.compat,
                                                         memory_fraction=args.gpu_memory_utilization)  # fmt: skip


def load_tokenizer(args: EngineArgs):
    from transformers import AutoTokenizer

    from ..weights import resolve_checkpoint

    return AutoTokenizer.from_pretrained(str(resolve_checkpoint(args.model)))


def load_processor(args: EngineArgs):
    from ..processing import Ovis2Processor
    from ..weights import resolve_checkpoint

    use_fast = args.image_processor == "fast"
    return Ovis2Processor.from_pretrained(str(resolve_checkpoint(args.model)), compat=args.compat, use_fast=use_fast)


class LLMEngine:
    def __init__(self, args: EngineArgs, model=None, tokenizer=None) -> None:
        self.args = args
        self.model = model if model is not None else load_model(args)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(args)
        self.runner = ModelRunner(self.model, args)
        if self.runner.num_blocks < 2:
            raise Ovis2Error(f"the KV cache budget holds {self.runner.num_blocks} blocks; raise kv_cache_memory")
        self.runner.allocate_kv_cache()
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens)
        self.groups: dict[str, SequenceGroup] = {}
        self.max_model_len = self._max_model_len()
        if self.runner.device.type == "cuda" and not args.enforce_eager:
            self.runner.enable_decode_graphs(self.max_model_len, capture=True)
        self.request_hook: Callable[[SequenceGroup], None] | None = None  # tests inject per-request faults here
        self.seed_generator = torch.Generator().manual_seed(args.seed)
        self.counters = {"num_prompt_tokens": 0, "num_cached_tokens": 0, "num_generated_tokens": 0,
                         "num_preemptions": 0}  # fmt: skip

    def _max_model_len(self) -> int:
        model_max = self.model.config.text_config.max_position_embeddings
        pool_max = self.runner.num_blocks * self.args.block_size  # one sequence must always fit alone
        return min(self.args.max_model_len or model_max, model_max, pool_max)

    # --- requests in
    def validate(self, inputs: EngineInputs, params: SamplingParams) -> None:
        """Raise Ovis2Error for a request the engine cannot serve (no state is touched)."""
        params.validate()
        num_tokens = len(inputs.prompt_token_ids)
        if num_tokens == 0:
            raise Ovis2Error("the prompt is empty")
        if num_tokens >= self.max_model_len:
            raise Ovis2Error(f"the prompt has {num_tokens} tokens; this model serves at most "
                             f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len})")  # fmt: skip
        if len(inputs.images) > self.args.max_images_per_request:
            raise Ovis2Error(f"{len(inputs.images)} images in one request; at most "
                             f"{self.args.max_images_per_request} are allowed")  # fmt: skip
        num_atoms = sum(1 for t in inputs.prompt_token_ids if t == IMAGE_ATOM_ID)
        num_embeds = sum(crop_count(image.grid) * TOKENS_PER_CROP for image in inputs.images)
        if num_atoms != num_embeds:
            raise Ovis2Error(f"the prompt has {num_atoms} image tokens but its images give {num_embeds}")
        for image in inputs.images:
            if image.num_crops != crop_count(image.grid):
                raise Ovis2Error(f"an image with grid {image.grid} needs {crop_count(image.grid)} crops, "
                                 f"not {image.num_crops}")  # fmt: skip
        if max(inputs.prompt_token_ids) >= self.model.config.vocab_size or min(inputs.prompt_token_ids) < 0:
            raise Ovis2Error("the prompt holds token ids outside the vocabulary")

    def add_request(self, request_id: str, inputs: EngineInputs, params: SamplingParams,
                    arrival_time: float | None = None) -> SequenceGroup:  # fmt: skip
        if request_id in self.groups:
            raise Ovis2Error(f"request id {request_id!r} is already running")
        self.validate(inputs, params)
        group = SequenceGroup(request_id, inputs, params, arrival_time=arrival_time or time.monotonic())
        for seq in group.seqs:
            seq.detok = IncrementalDetokenizer(self.tokenizer, params)
            seq.generator = self._generator_for(seq)
        self.groups[request_id] = group
        self.scheduler.add(group)
        return group

    def _generator_for(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.is_greedy:
            return None
        seed = seq.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.seed_generator))
        return torch.Generator(device=self.runner.device).manual_seed(seed + seq.index)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its last output (finish_reason "abort")."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        return self._finish_group(group, "abort")

    def _finish_group(self, group: SequenceGroup, reason: str, error: str | None = None) -> RequestOutput:
        group.error = error
        for seq in group.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
        group.image_embeds = None
        group.metrics.finished_time = time.monotonic()
        return self._make_output(group)

    # --- the step
    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.counters["num_preemptions"] += len(sched.preempted)
        if sched.is_empty:
            return []
        outputs = self._fail_broken_requests(sched)
        if sched.is_empty:
            return outputs
        logits, failed = self._execute_isolating_failures(sched)
        outputs += failed
        if sched.is_empty:
            return outputs
        self.scheduler.update_computed(sched)
        try:
            return outputs + self._postprocess(sched, logits)
        except Exception as error:  # noqa: BLE001 - a failed sampling step fails its requests, not the engine
            logger.exception("sampling step failed")
            return outputs + self._fail_groups({item.seq.group for item in sched.scheduled}, error)

    def _execute_isolating_failures(self, sched: SchedulerOutput) -> tuple[torch.Tensor | None, list[RequestOutput]]:
        """Runs the batch; if it fails, runs each request alone so only the ones that fail by themselves fail.

        Rerunning is safe: a request's KV writes go to its own slots, and rewriting them gives the same values."""
        try:
            return self.runner.execute(sched.scheduled), []
        except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, not the engine
            groups = list({id(i.seq.group): i.seq.group for i in sched.scheduled}.values())
            logger.exception("model step failed for a batch of %d requests", len(groups))
            if len(groups) == 1:
                sched.scheduled = []
                return None, self._fail_groups(groups, error)
        rows: dict[int, torch.Tensor] = {}
        failed = []
        for group in groups:
            items = [item for item in sched.scheduled if item.seq.group is group]
            try:
                logits = self.runner.execute(items)
            except Exception as error:  # noqa: BLE001
                failed.append(self._fail_group(group, error))
                continue
            sampled = [item for item in items if item.samples]
            rows.update({id(item): logits[index] for index, item in enumerate(sampled)})
        sched.scheduled = [item for item in sched.scheduled if item.seq.group.request_id in self.groups]
        sampled = [rows[id(item)] for item in sched.scheduled if item.samples]
        return (torch.stack(sampled) if sampled else None), failed

    def _fail_broken_requests(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """Per-request preparation (fault hook, image embeddings); a failure fails that request only."""
        groups = list({id(i.seq.group): i.seq.group for i in sched.scheduled}.values())
        failures: dict[str, Exception] = {}
        now = time.monotonic()
        for group in groups:
            group.metrics.first_scheduled_time = group.metrics.first_scheduled_time or now
            try:
                if self.request_hook is not None:
                    self.request_hook(group)
            except Exception as error:  # noqa: BLE001
                failures[group.request_id] = error
        healthy = [g for g in groups if g.request_id not in failures]
        failures.update(self.runner.prepare_images(healthy))
        if not failures:
            return []
        failed = {g for g in groups if g.request_id in failures}
        sched.scheduled = [item for item in sched.scheduled if item.seq.group not in failed]
        return [self._fail_group(g, failures[g.request_id]) for g in failed]

    def _fail_groups(self, groups, error: Exception) -> list[RequestOutput]:
        return [self._fail_group(group, error) for group in groups]

    def _fail_group(self, group: SequenceGroup, error: Exception) -> RequestOutput:
        logger.warning("request %s failed: %s", group.request_id, error)
        self.groups.pop(group.request_id, None)
        return self._finish_group(group, "error", error=f"{type(error).__name__}: {error}")

    def _postprocess(self, sched: SchedulerOutput, logits: torch.Tensor | None) -> list[RequestOutput]:
        sampled = [item for item in sched.scheduled if item.samples]
        self._count_prompt_tokens(sched.scheduled)
        touched: dict[str, SequenceGroup] = {}
        if sampled:
            rows = [SamplingRow(i.seq.params, i.seq.group.prompt_token_ids, i.seq.output_token_ids, i.seq.generator)
                    for i in sampled]  # fmt: skip
            result = sample(logits, rows)
            now = time.monotonic()
            for item, token_id, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True):
                self._append_token(item.seq, token_id, logprob)
                item.seq.group.metrics.first_token_time = item.seq.group.metrics.first_token_time or now
                touched[item.seq.group.request_id] = item.seq.group
        for group in {id(i.seq.group): i.seq.group for i in sched.scheduled}.values():
            if group.image_embeds is not None and not group.needs_image_embeds:
                group.image_embeds = None  # every choice is past its images: drop them (the LRU keeps a copy)
        return [self._output_for(group) for group in touched.values()]

    def _count_prompt_tokens(self, scheduled: list[ScheduledSeq]) -> None:
        for item in scheduled:
            if item.start < item.seq.prompt_len:
                self.counters["num_prompt_tokens"] += min(item.end, item.seq.prompt_len) - item.start

    def _append_token(self, seq: Sequence, token_id: int, logprob) -> None:
        seq.append_token(token_id)
        self.counters["num_generated_tokens"] += 1
        if logprob is not None:
            seq.logprobs.append(self._token_logprob(seq, token_id, logprob))
        reason = self._stop_reason(seq, token_id)
        if reason is not None:
            self.scheduler.finish(seq)
            seq.finish_reason = reason

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if token_id in params.stopping_token_ids and seq.num_output_tokens > params.min_tokens:
            seq.stop_reason = token_id
            return "stop"
        stop = seq.detok.add_token(token_id, check_stops=seq.num_output_tokens >= params.min_tokens)
        if stop is not None:
            seq.stop_reason = stop
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _token_logprob(self, seq: Sequence, token_id: int, logprob) -> TokenLogprob:
        chosen, top = logprob
        text = seq.detok.token_text
        return TokenLogprob(token_id, text(token_id), chosen, [(t, text(t), lp) for t, lp in top])

    def _output_for(self, group: SequenceGroup) -> RequestOutput:
        if group.is_finished:
            self.groups.pop(group.request_id, None)
            group.metrics.finished_time = time.monotonic()
            self.counters["num_cached_tokens"] += group.seqs[0].num_cached_tokens
        return self._make_output(group)

    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        return RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=[_completion(seq) for seq in group.seqs],
            num_image_tokens=group.inputs.num_image_tokens,
            num_cached_tokens=group.seqs[0].num_cached_tokens,
            error=group.error,
            metrics=group.metrics,
        )

    # --- introspection
    @property
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_total_blocks,
                           kv_cache_usage=bm.usage, num_encoded_images=self.runner.num_encoded_images,
                           **self.counters)  # fmt: skip


def _completion(seq: Sequence) -> CompletionOutput:
    """What is new since the last output of this sequence, and everything so far (when the request asked for
    cumulative outputs, or once the sequence is finished)."""
    finished = seq.is_finished
    cumulative = finished or seq.params.output_kind == "cumulative"
    delta_text = seq.detok.take_delta(finished)
    output_ids = seq.output_token_ids
    first_new = seq.num_reported_tokens
    seq.num_reported_tokens = len(output_ids)
    logprobs = None if seq.logprobs is None else (list(seq.logprobs) if cumulative else [])
    return CompletionOutput(
        index=seq.index,
        text=seq.detok.text[: seq.detok.num_emitted_chars] if cumulative else "",
        token_ids=list(output_ids) if cumulative else [],
        delta_text=delta_text,
        delta_token_ids=output_ids[first_new:],
        logprobs=logprobs,
        delta_logprobs=None if seq.logprobs is None else seq.logprobs[first_new:],
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )
