"""What the engine hands back: one RequestOutput per request per step, holding every choice."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (a replacement character where it holds part of a character)
    logprob: float
    top: list[TokenLogprob] = field(
        default_factory=list
    )  # the most likely tokens at this step (no top of their own)
    bytes: list[int] | None = None  # the token's own UTF-8 bytes
    rank: int | None = None  # prompt logprobs: the token's rank in its distribution (1: the most likely)


@dataclass
class CompletionOutput:
    index: int
    # everything generated so far; a stop string or stop token only with include_stop_str_in_output
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""  # new since the previous RequestOutput
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # all so far, when asked
    delta_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    # the stop string, or the id of one of the request's stop_token_ids, that ended it; None at the model's own end
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic()) for the server's metrics: queue time, TTFT, end-to-end latency."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_image_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # set when this request failed inside the engine
    user_error: bool = (
        False  # the failure is the request's own (say, a constraint at a dead end): `error` says why
    )
    metrics: RequestMetrics | None = None  # timestamps, shared and updated while the request runs
    # SamplingParams.prompt_logprobs: entry p is prompt token p's logprob given the tokens before it, with the top
    # k there; None for the first token and image placeholders. In every output from the first tokens on.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
