"""What the engine hands back: one RequestOutput per request per step, holding every choice."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token text, logprob)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""  # everything generated so far, stop strings removed
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""  # new since the previous RequestOutput
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # all so far, when asked
    delta_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_image_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # set when this request failed inside the engine

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
