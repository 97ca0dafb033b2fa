"""What the engine core hands out each step: token ids and finish reasons per request, failures by request id."""

from __future__ import annotations

from dataclasses import dataclass, field

from .outputs import RequestMetrics

# (the token's logprob, [(token id, logprob)] most likely first), and for prompt tokens the token's rank (1: the
# most likely)
RawLogprob = tuple[float, list[tuple[int, float]]] | tuple[float, list[tuple[int, float]], int]


@dataclass
class TokenUpdate:
    """One choice's new token this step, and why the core finished the choice, if it did."""

    index: int
    token_id: int
    logprob: RawLogprob | None = None
    finish_reason: str | None = None  # "stop" (a stop token) | "length"


@dataclass
class RequestUpdate:
    request_id: str
    tokens: list[TokenUpdate]
    num_cached_tokens: int
    metrics: RequestMetrics
    # asked for: each prompt token's logprob (None for the first), with the request's first tokens
    prompt_logprobs: list[RawLogprob | None] | None = None


@dataclass
class RequestFailure:
    error: str  # what went wrong, for the log and RequestOutput.error
    num_cached_tokens: int
    user_error: bool = (
        False  # the request's own input caused it (an Ovis2Error): the message is for its sender
    )


@dataclass
class CoreStepOutput:
    updates: list[RequestUpdate] = field(default_factory=list)
    failed: dict[str, RequestFailure] = field(default_factory=dict)  # by request id; finished in the core

    @property
    def is_empty(self) -> bool:
        return not self.updates and not self.failed
