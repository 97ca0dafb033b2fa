"""Output processing: token ids from the core -> text (incremental detokenizer, stop strings), logprobs, and
the delta or cumulative RequestOutputs the engine hands out. A stop string it finds ends that choice in the core
(`process` returns the choices to finish)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .core_outputs import CoreStepOutput, RawLogprob, RequestUpdate, TokenUpdate
from .detokenizer import IncrementalDetokenizer, backend_of
from .outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams
from .token_bytes import TokenBytes

logger = logging.getLogger(__name__)


class ChoiceState:
    """One choice's text, ids and logprobs so far, and what of them has been handed out."""

    def __init__(self, index: int, detok: IncrementalDetokenizer, params: SamplingParams) -> None:
        self.index = index
        self.detok = detok
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.num_reported_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, update: TokenUpdate, logprob: TokenLogprob | None) -> bool:
        """Takes one token; True when it completed a stop string the core does not know of yet."""
        self.token_ids.append(update.token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if update.finish_reason == "stop":  # a stop token ends the text; part of it only when asked for
            if self.params.include_stop_str_in_output:
                self.detok.add_token(update.token_id, check_stops=False)
            # vLLM's convention: an id only for the request's own stop_token_ids, None for the model's end
            own = update.token_id in (self.params.stop_token_ids or ())
            self.finish_reason, self.stop_reason = "stop", update.token_id if own else None
            return False
        stop = self.detok.add_token(
            update.token_id, check_stops=len(self.token_ids) >= self.params.min_tokens
        )
        if stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
            return update.finish_reason is None
        self.finish_reason = update.finish_reason
        return False

    def completion(self) -> CompletionOutput:
        """What is new since this choice's last output, and everything so far (when the request asked for
        cumulative outputs, or once the choice is finished)."""
        finished = self.is_finished
        cumulative = finished or self.params.output_kind == "cumulative"
        delta_text = self.detok.take_delta(finished)
        first_new, self.num_reported_tokens = self.num_reported_tokens, len(self.token_ids)
        logprobs = self.logprobs
        return CompletionOutput(
            index=self.index,
            text=self.detok.text[: self.detok.num_emitted_chars] if cumulative else "",
            token_ids=list(self.token_ids) if cumulative else [],
            delta_text=delta_text,
            delta_token_ids=self.token_ids[first_new:],
            logprobs=None if logprobs is None else (list(logprobs) if cumulative else []),
            delta_logprobs=None if logprobs is None else logprobs[first_new:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    num_image_tokens: int
    choices: list[ChoiceState]
    metrics: RequestMetrics | None
    num_cached_tokens: int = 0
    error: str | None = None
    user_error: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def is_finished(self) -> bool:
        return all(choice.is_finished for choice in self.choices)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[choice.completion() for choice in self.choices],
            num_image_tokens=self.num_image_tokens,
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
            user_error=self.user_error,
            metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs,
        )


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput] = field(
        default_factory=list
    )  # one per request that moved, failed or finished
    stopped: list[tuple[str, int]] = field(default_factory=list)  # (request id, choice) a stop string ended
    failed: list[str] = field(
        default_factory=list
    )  # requests whose output could not be built: abort in the core


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = backend_of(tokenizer)
        self.token_bytes = TokenBytes(self.backend)
        self.requests: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        num_image_tokens: int,
        params: SamplingParams,
        metrics: RequestMetrics | None = None,
    ) -> None:
        choices = [
            ChoiceState(i, IncrementalDetokenizer(self.tokenizer, params), params) for i in range(params.n)
        ]
        self.requests[request_id] = RequestState(
            request_id, prompt_token_ids, num_image_tokens, choices, metrics
        )

    def process(self, step: CoreStepOutput) -> ProcessedStep:
        processed = ProcessedStep()
        for update in step.updates:
            state = self.requests.get(update.request_id)
            if state is not None:
                self._process_update(state, update, processed)
        for request_id, failure in step.failed.items():
            output = self.finish_request(
                request_id, "error", failure.error, failure.num_cached_tokens, failure.user_error
            )
            if output is not None:
                processed.outputs.append(output)
        return processed

    def _process_update(self, state: RequestState, update: RequestUpdate, processed: ProcessedStep) -> None:
        try:
            stopped = self._apply(state, update)
            output = self._output(state)
        except Exception as error:  # noqa: BLE001 - a request whose output cannot be built fails alone
            logger.exception("output processing failed for request %s", state.request_id)
            processed.failed.append(state.request_id)
            processed.outputs.append(
                self.finish_request(state.request_id, "error", f"{type(error).__name__}: {error}")
            )
            return
        processed.stopped += stopped
        processed.outputs.append(output)

    def finish_request(
        self,
        request_id: str,
        reason: str,
        error: str | None = None,
        num_cached_tokens: int | None = None,
        user_error: bool = False,
    ) -> RequestOutput | None:
        """The last output of a request the core stopped (abort, error); None if it is not here."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        state.error, state.user_error = error, user_error
        if num_cached_tokens is not None:
            state.num_cached_tokens = num_cached_tokens
        for choice in state.choices:
            if not choice.is_finished:
                choice.finish_reason = reason
        return state.output()

    def _apply(self, state: RequestState, update: RequestUpdate) -> list[tuple[str, int]]:
        state.num_cached_tokens = update.num_cached_tokens
        if update.prompt_logprobs is not None:
            state.prompt_logprobs = [
                None if raw is None else self._token_logprob(token_id, raw)
                for token_id, raw in zip(state.prompt_token_ids, update.prompt_logprobs, strict=True)
            ]
        stopped = []
        for token in update.tokens:
            choice = state.choices[token.index]
            logprob = None if token.logprob is None else self._token_logprob(token.token_id, token.logprob)
            if choice.add(token, logprob):
                stopped.append((state.request_id, token.index))
        return stopped

    def _output(self, state: RequestState) -> RequestOutput:
        if state.is_finished:
            self.requests.pop(state.request_id, None)
        return state.output()

    def _token_logprob(self, token_id: int, raw: RawLogprob) -> TokenLogprob:
        chosen, top, *rank = raw
        return TokenLogprob(
            token_id,
            self._text(token_id),
            chosen,
            [self._entry(t, lp) for t, lp in top],
            self.token_bytes(token_id),
            rank[0] if rank else None,
        )

    def _entry(self, token_id: int, logprob: float) -> TokenLogprob:
        return TokenLogprob(token_id, self._text(token_id), logprob, [], self.token_bytes(token_id))

    def _text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)
