"""The choices of a /v1/completions answer, whole or streamed: prompt k's choice i is choice k x n + i.

With `echo`, each choice starts with its prompt's text; with `echo` and `logprobs`, its logprobs start with the
prompt's tokens (the first has none: null, as OpenAI's legacy API gives it). `echo` with `max_tokens: 0` answers
the prompt alone: the engine runs one token, which is left out of the answer and of the usage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing

from .answers import usage_of
from .engine_api import CompletionOutput, RequestOutput, TokenLogprob
from .prompt_logprobs import prompt_logprobs_field
from .protocol import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage, now
from .streaming import chunk_payload, sse


@dataclasses.dataclass
class Echo:
    """What each prompt puts in front of its choices."""

    texts: list[str]  # the prompt as sent ("" each without echo)
    first_tokens: list[str] | None = None  # with prompt logprobs: the text of each prompt's first token
    only: bool = False  # max_tokens 0: the prompt alone


class CompletionBuilder:
    def __init__(
        self, request_id: str, model: str, echo: Echo, n: int, want_logprobs: bool, want_prompt_logprobs: bool
    ):
        """`want_prompt_logprobs`: vLLM's `prompt_logprobs` field in each choice of a whole answer."""
        self.request_id, self.model, self.echo, self.n = request_id, model, echo, n
        self.want_logprobs, self.want_prompt_logprobs = want_logprobs, want_prompt_logprobs
        self.created = now()
        self.offsets: dict[int, int] = {}
        self.prompt_logprobs: list[list[TokenLogprob | None] | None] = [None] * len(echo.texts)

    async def recording(self, k: int, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Prompt k's outputs, passed on; the prompt logprobs they bring are kept for its choices."""
        async with aclosing(outputs):
            async for output in outputs:
                if output.prompt_logprobs is not None:
                    self.prompt_logprobs[k] = output.prompt_logprobs
                yield output

    def prompt_text(self, index: int) -> str:
        return self.echo.texts[index // self.n]

    def logprobs(
        self, index: int, logprobs: list[TokenLogprob] | None, first: bool
    ) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        result = CompletionLogprobs()
        offset = self.offsets.get(index, 0)
        if first and self.echo.first_tokens is not None:
            k = index // self.n
            entries = self.prompt_logprobs[k]
            assert entries is not None, "a choice started before its prompt's logprobs came"
            for position, entry in enumerate(entries):
                if entry is None:  # the first token (completions refuse image placeholders, the other kind)
                    assert position == 0, "a text prompt's token without a logprob"
                    offset = _append(result, self.echo.first_tokens[k], None, None, offset)
                else:
                    offset = _append(result, entry.token, entry.logprob, _top(entry), offset)
        for lp in () if self.echo.only else logprobs or ():
            offset = _append(result, lp.token, lp.logprob, _top(lp), offset)
        self.offsets[index] = offset
        return result

    def full(self, output: CompletionOutput) -> CompletionChoice:
        return CompletionChoice(
            index=output.index,
            text=self.prompt_text(output.index) + ("" if self.echo.only else output.text),
            logprobs=self.logprobs(output.index, output.logprobs, first=True),
            prompt_logprobs=self._prompt_logprobs_field(output.index),
            **self._ending(output),
        )

    def _prompt_logprobs_field(self, index: int) -> list[dict[str, dict] | None] | None:
        if not self.want_prompt_logprobs:
            return None
        entries = self.prompt_logprobs[index // self.n]
        assert entries is not None, "a finished answer without its prompt's logprobs"
        return prompt_logprobs_field(entries)

    def delta(self, output: CompletionOutput, first: bool) -> CompletionChoice | None:
        """None while there is nothing to send. A choice starts with its first token: with several prompts, the
        merged outputs hold choices whose prompt has not reached the engine's outputs yet (nor its prompt logprobs)."""
        if first and not (output.delta_token_ids or output.finished):
            return None
        text = (self.prompt_text(output.index) if first else "") + (
            "" if self.echo.only else output.delta_text
        )
        moved = self.want_logprobs and bool(output.delta_logprobs) and not self.echo.only
        if not text and not output.finished and not moved:
            return None
        return CompletionChoice(
            index=output.index,
            text=text,
            logprobs=self.logprobs(output.index, output.delta_logprobs, first),
            **self._ending(output),
        )

    def delta_chunk(self, output: CompletionOutput, first: bool, include_usage: bool) -> str | None:
        """The SSE chunk of `delta`, or None."""
        delta = self.delta(output, first)
        return None if delta is None else self.chunk([delta], None, include_usage)

    def starts_with_prompt_logprobs(self, first: bool) -> bool:
        """A choice's first chunk lists its prompt's logprobs (up to the cap's 2^18 values)."""
        return first and self.want_logprobs and self.echo.first_tokens is not None

    def _ending(self, output: CompletionOutput) -> dict:
        if self.echo.only:  # its one token was run, not asked for: the prompt is the whole answer
            return dict(finish_reason="length" if output.finished else None, stop_reason=None)
        return dict(finish_reason=output.finish_reason, stop_reason=output.stop_reason)

    def usage(self, output: RequestOutput) -> Usage:
        usage = usage_of(output)
        if self.echo.only:
            usage.total_tokens -= usage.completion_tokens
            usage.completion_tokens = 0
        return usage

    def response(self, final: RequestOutput) -> CompletionResponse:
        choices = [self.full(o) for o in sorted(final.outputs, key=lambda o: o.index)]
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage(final),
        )

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None, include_usage: bool) -> str:
        response = CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk_payload(response, include_usage))


def _top(lp: TokenLogprob) -> dict[str, float]:
    """The legacy API always lists the token itself among the top ones: up to logprobs + 1 entries (a top token
    decoding to the same text keeps its own value)."""
    return {lp.token: lp.logprob, **{top.token: top.logprob for top in lp.top}}


def _append(
    result: CompletionLogprobs, token: str, logprob: float | None, top: dict | None, offset: int
) -> int:
    result.tokens.append(token)
    result.token_logprobs.append(logprob)
    result.top_logprobs.append(top)
    result.text_offset.append(offset)
    return offset + len(token)
