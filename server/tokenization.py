"""/tokenize and /detokenize in vLLM's shape; chat messages count their image tokens from the images' sizes.

The tokenizer runs in a thread: a prompt near the body cap takes it many seconds, and on the event loop that
would stall every other request."""

from __future__ import annotations

import asyncio

from .chat_inputs import chat_token_ids
from .errors import bad_request
from .protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    unsupported_chat_fields,
)
from .sampling import check_token_ids
from .state import ServerState
from .videos import video_options


async def tokenize(state: ServerState, request: TokenizeRequest) -> TokenizeResponse:
    state.check_model(request.model)
    tokenizer = state.engine.tokenizer
    image_tokens = 0
    if request.prompt is not None:
        ids = await asyncio.to_thread(
            tokenizer.encode, request.prompt, add_special_tokens=request.add_special_tokens
        )
    else:
        problem = unsupported_chat_fields(ChatCompletionRequest(messages=request.messages))
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        ids, image_tokens = await chat_token_ids(
            state, request.messages, request.max_tiles_per_image, video_options(request)
        )
    token_strs = (
        await asyncio.to_thread(tokenizer.convert_ids_to_tokens, ids) if request.return_token_strs else None
    )
    return TokenizeResponse(
        count=len(ids),
        max_model_len=state.max_model_len,
        tokens=ids,
        token_strs=token_strs,
        image_tokens=image_tokens,
    )


async def detokenize(state: ServerState, request: DetokenizeRequest) -> DetokenizeResponse:
    state.check_model(request.model)
    check_token_ids(request.tokens, state.vocab_size, "tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(state.engine.tokenizer.decode, request.tokens))
