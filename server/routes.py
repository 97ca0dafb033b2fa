"""HTTP routes: parse, hand to the serving logic, return. Nothing else lives here."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from .chat import create_chat_completion
from .completions import create_completion
from .engine_api import EngineDeadError
from .errors import ENGINE_DEAD, error_response
from .metrics import CONTENT_TYPE
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .protocol.responses import ResponsesRequest
from .responses import create_response
from .state import ServerState, get_state
from .tokenization import detokenize, tokenize

router = APIRouter()
State = Annotated[ServerState, Depends(get_state)]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    return await create_chat_completion(state, body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    return await create_completion(state, body, request)


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request, state: State) -> Response:
    return await create_response(state, body, request)


@router.get("/v1/models")
async def list_models(state: State) -> ModelList:
    card = ModelCard(
        id=state.model_id,
        created=state.started_at,
        root=state.settings.model,
        max_model_len=state.max_model_len,
    )
    return ModelList(data=[card])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> ModelCard:
    state.check_model(model_id)
    return ModelCard(
        id=state.model_id,
        created=state.started_at,
        root=state.settings.model,
        max_model_len=state.max_model_len,
    )


@router.post("/tokenize")
async def tokenize_route(body: TokenizeRequest, state: State) -> TokenizeResponse:
    return await tokenize(state, body)


@router.post("/detokenize")
async def detokenize_route(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    return await detokenize(state, body)


@router.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with either
async def health(state: State) -> Response:
    try:
        state.engine.check_health()
    except EngineDeadError:
        return error_response(ENGINE_DEAD, 503, code="engine_dead")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    state.metrics.update_engine_stats(state.engine.stats)
    state.metrics.update_pixel_budget(state.images.budget)
    state.metrics.update_media_bytes(state.media_bytes)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
