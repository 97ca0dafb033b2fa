"""Request fields -> SamplingParams, with the context-length check; errors name the field at fault."""

from __future__ import annotations

import re

from .engine_api import Ovis2Error, SamplingParams, StructuredOutputsParams
from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest

_PARAM_NAME = re.compile(r"'(\w+)'")
MAX_STOP_CHARS = 256  # the engine's per-token scan of a stop string grows with the square of its length
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's cap; the engine applies each entry again on every step


def resolve_max_tokens(
    requested: int | None,
    num_prompt_tokens: int,
    num_image_tokens: int,
    max_model_len: int,
    prompt_field: str = "messages",
    tokens_field: str = "max_tokens",
) -> int:
    """The output budget: what was asked (in `tokens_field`), else the rest of the context; a 400 (on
    `prompt_field` or `tokens_field`) when it cannot fit."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        fix = f"shorten the {prompt_field}" + (" or send fewer or smaller images" if num_image_tokens else "")
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens ({num_image_tokens} of them for images) but the model's "
            f"context is {max_model_len} tokens; {fix}",
            prompt_field,
        )
    if requested is None:
        return room
    if requested < 1:
        raise bad_request(f"{tokens_field} must be at least 1", tokens_field)
    if requested > room:
        raise bad_request(
            f"{tokens_field} is {requested} but the prompt already has {num_prompt_tokens} tokens "
            f"({num_image_tokens} for images) of the model's {max_model_len}; ask for at most {room}",
            tokens_field,
        )
    return requested


def parse_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    if logit_bias and len(logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise bad_request(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens", "logit_bias")
    result = {}
    for key, value in (logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, not {key!r}", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"logit_bias token id {token_id} is outside the vocabulary", "logit_bias")
        result[token_id] = float(value)
    return result


def check_token_ids(token_ids: list[int] | None, vocab_size: int, param: str) -> None:
    for token_id in token_ids or ():
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"token id {token_id} is outside the vocabulary (0..{vocab_size - 1})", param)


def build_sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    vocab_size: int,
    structured_outputs: StructuredOutputsParams | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    if request.prompt_logprobs is not None and request.stream:
        raise bad_request("prompt_logprobs are not available when streaming (as in vLLM)", "prompt_logprobs")
    check_token_ids(request.stop_token_ids, vocab_size, "stop_token_ids")
    stop_token_ids = list(dict.fromkeys(request.stop_token_ids)) if request.stop_token_ids else None
    stop = request.stop if request.stop is not None else []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(f"stop strings may be at most {MAX_STOP_CHARS} characters long", "stop")
    kwargs = dict(
        n=request.n if request.n is not None else 1,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        temperature=request.temperature if request.temperature is not None else 1.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        top_k=request.top_k if request.top_k is not None else 0,
        min_p=request.min_p if request.min_p is not None else 0.0,
        repetition_penalty=request.repetition_penalty if request.repetition_penalty is not None else 1.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=parse_logit_bias(request.logit_bias, vocab_size),
        seed=request.seed,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        output_kind="delta",  # streams use the deltas, whole answers the finished output
        structured_outputs=structured_outputs,
    )
    try:
        return SamplingParams(**kwargs)
    except Ovis2Error as exc:
        message = str(exc)
        match = _PARAM_NAME.search(message)
        engine_name = name = match.group(1) if match else None
        if name == "logprobs" and isinstance(request, ChatCompletionRequest):
            name = "top_logprobs"
        if (
            name == "max_tokens"
            and isinstance(request, ChatCompletionRequest)
            and request.max_completion_tokens
        ):
            name = "max_completion_tokens"
        if name != engine_name:  # the message names the field the request sent
            message = message.replace(f"'{engine_name}'", f"'{name}'", 1)
        raise bad_request(message, name) from None
