"""How one request wants its tokens chosen and when it wants to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import Ovis2Error
from ..tokenizer import DEFAULT_EOS_IDS
from .scalars import as_flag, is_integer, is_real
from .structured.params import StructuredOutputsParams

MAX_N = 16
MAX_TOP_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5


INTEGERS = ("n", "max_tokens", "min_tokens", "top_k")
OPTIONAL_INTEGERS = ("seed", "logprobs", "prompt_logprobs")
NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
FLAGS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 256
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = (
        None  # stop on these too, besides the model's eos ids (even with ignore_eos)
    )
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top k
    # None: off; k >= 0: each prompt token's logprob given the tokens before it, plus the top k there (the first
    # token has none); such a request skips the prefix cache, whose positions have no logits
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # "cumulative": every output holds all text, ids and logprobs so far, besides the deltas; "delta": outputs
    # before the last hold only the deltas (no O(length) copies per step), the finished one holds everything
    output_kind: str = "cumulative"
    # the output must match this JSON schema / regex / choice / grammar (constrained decoding); the grammar then
    # decides where the answer ends, so ignore_eos and min_tokens cannot be combined with it
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:  # vLLM takes None for "none"
            self.stop = []
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple | set | frozenset):
            self.stop_token_ids = list(self.stop_token_ids)
        for name in FLAGS:
            setattr(self, name, as_flag(getattr(self, name)))
        if self.logit_bias is None:
            self.logit_bias = {}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        # below GREEDY_TEMPERATURE a draw differs from the argmax only at exact ties of the logits (vLLM's rule)
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def stopping_token_ids(self) -> frozenset[int]:
        """Ids that end this request: the caller's stop ids, plus the eos ids unless ignore_eos."""
        extra = frozenset(self.stop_token_ids or ())
        return extra if self.ignore_eos else extra | frozenset(DEFAULT_EOS_IDS)

    def validate(self) -> None:
        for ok, name, rule in self._type_checks():  # first: the range checks below compare values
            if not ok:
                raise Ovis2Error(f"invalid sampling parameter '{name}': {rule}")
        checks = [
            (1 <= self.n <= MAX_N, "n", f"must be between 1 and {MAX_N}"),
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be between 0 and max_tokens"),
            (self.temperature >= 0.0, "temperature", "must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 or -1 disables it)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                "prompt_logprobs",
                f"must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (
                all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                "logit_bias",
                "values must be in [-100, 100]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (len(self.stop) <= 16, "stop", "at most 16 stop strings"),
            (
                self.seed is None or -(2**63) <= self.seed < 2**63,
                "seed",
                "must fit in a signed 64-bit integer",
            ),
            (self.output_kind in ("cumulative", "delta"), "output_kind", "must be 'cumulative' or 'delta'"),
        ]
        checks += [(math.isfinite(getattr(self, name)), name, "must be a finite number") for name in NUMBERS]
        checks += self._structured_checks()
        for ok, name, rule in checks:
            if not ok:
                raise Ovis2Error(f"invalid sampling parameter '{name}': {rule}")

    def _type_checks(self) -> list[tuple[bool, str, str]]:
        checks = [(is_integer(getattr(self, name)), name, "must be an integer") for name in INTEGERS]
        checks += [
            (
                getattr(self, name) is None or is_integer(getattr(self, name)),
                name,
                "must be an integer or None",
            )
            for name in OPTIONAL_INTEGERS
        ]
        checks += [(is_real(getattr(self, name)), name, "must be a number") for name in NUMBERS]
        checks += [(isinstance(getattr(self, name), bool), name, "must be true or false") for name in FLAGS]
        bias, stop_ids = self.logit_bias, self.stop_token_ids
        return checks + [
            (isinstance(self.stop, list), "stop", "must be a string or a list of strings"),
            (
                stop_ids is None or isinstance(stop_ids, list | tuple) and all(map(is_integer, stop_ids)),
                "stop_token_ids",
                "must be a list of token ids",
            ),
            (
                isinstance(bias, dict) and all(is_integer(k) and is_real(v) for k, v in bias.items()),
                "logit_bias",
                "must map token ids (integers) to numbers",
            ),
        ]

    def _structured_checks(self) -> list[tuple[bool, str, str]]:
        if self.structured_outputs is None:
            return []
        self.structured_outputs.validate()
        ends = "with structured outputs, whose grammar decides where the answer ends"
        return [
            (not self.ignore_eos, "ignore_eos", f"cannot be true {ends}"),
            (self.min_tokens == 0, "min_tokens", f"must be 0 {ends}"),
        ]
