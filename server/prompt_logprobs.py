"""vLLM's `prompt_logprobs` answer field: per prompt token, None (the first token, image placeholders) or
{token id: {logprob, rank, decoded_token}} for the token itself and the top k there."""

from __future__ import annotations

from .engine_api import TokenLogprob
from .errors import bad_request

# values in one answer: prompt tokens x (k + 1), for each choice that carries them
MAX_PROMPT_LOGPROB_VALUES = 2**18


def prompt_logprobs_field(entries: list[TokenLogprob | None]) -> list[dict[str, dict] | None]:
    return [None if entry is None else _entry(entry) for entry in entries]


def _entry(entry: TokenLogprob) -> dict[str, dict]:
    tops = {str(t.token_id): _value(t.logprob, rank, t.token) for rank, t in enumerate(entry.top, start=1)}
    return {**tops, str(entry.token_id): _value(entry.logprob, entry.rank, entry.token)}


def _value(logprob: float, rank: int | None, token: str) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": token}


def check_prompt_logprob_values(num_values: int, param: str) -> None:
    """A 400 naming `param` when an answer would carry more than MAX_PROMPT_LOGPROB_VALUES prompt logprobs."""
    if num_values > MAX_PROMPT_LOGPROB_VALUES:
        raise bad_request(
            f"the answer would hold {num_values} prompt logprob values (prompt tokens x (k + 1) for each choice "
            f"that carries them); at most {MAX_PROMPT_LOGPROB_VALUES} are allowed: send fewer or shorter prompts, "
            f"or a smaller n or k",
            param,
        )
