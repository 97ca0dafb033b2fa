"""Every failure leaves as the OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_api import EngineDeadError, EngineOverloadedError, Ovis2Error

logger = logging.getLogger("ovis2.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


ENGINE_DEAD = "the inference engine is not running"
RETRY_AFTER_SECONDS = "1"


class APIError(Exception):
    """A failure the client should see, with its HTTP status and the request field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param=param)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    error_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


# The labels pydantic puts in an error's location for the branch of a union that failed ('str', 'list[str]',
# 'tagged-union[...]', and protocol.py's tags 'list[parts]', 'part[text]'...): not request fields, so left out of
# `param` (`stop: 5` is param 'stop', not 'stop.str').
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|bytes|none|[\w-]+\[.*\])$")

_NOT_AN_OBJECT = ("model_type", "model_attributes_type", "dict_type")


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if not _UNION_BRANCH.match(p)]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "the request needs a JSON body", None
    param = _location(tuple(first.get("loc", ()))) or None
    message = first.get("msg", "invalid value")
    if first.get("type") in _NOT_AN_OBJECT:  # pydantic names the model class: not a name the client knows
        message = "Input should be a JSON object"
    message = message.removeprefix("Value error, ")
    text = f"{param}: {message}" if param else message
    param = param or _field_named_first(message, getattr(exc, "body", None))
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text, param


def _field_named_first(message: str, body) -> str | None:
    """A whole-request check has no location; its message names the field first ("Value error, top_logprobs
    needs ..."): that field, when the request sent it."""
    words = message.split(" ", 1)
    return words[0] if isinstance(body, dict) and words[0] in body else None


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if content_type and not _is_json(content_type) and _body_not_parsed(exc):
        # FastAPI parses only JSON bodies; curl's -d alone sends application/x-www-form-urlencoded
        message = (
            f"the request body must be JSON sent with Content-Type: application/json (got {content_type!r})"
        )
        return error_response(message, 400)
    message, param = _validation_message(exc)
    return error_response(message, 400, param)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _body_not_parsed(exc: RequestValidationError) -> bool:
    return any(tuple(error.get("loc", ())) == ("body",) for error in exc.errors())


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    response = error_response(exc.message, exc.status, exc.param, exc.code)
    return _busy(response) if exc.status == 503 and exc.code != "engine_dead" else response


async def _on_ovis2_error(request: Request, exc: Ovis2Error) -> JSONResponse:
    return error_response(str(exc), 400)


async def _on_overloaded(request: Request, exc: Exception) -> JSONResponse:
    return _busy(error_response("the server is overloaded; retry later", 503, code="overloaded"))


def _busy(response: JSONResponse) -> JSONResponse:
    """A 503 for a busy server, not a broken one: come back soon."""
    response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    return response


async def _on_engine_dead(request: Request, exc: Exception) -> JSONResponse:
    logger.error("engine is dead: %s", exc)
    return error_response(ENGINE_DEAD, 503, code="engine_dead")


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return JSONResponse(
        error_body(message, exc.status_code), status_code=exc.status_code, headers=exc.headers
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response("internal server error", 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(Ovis2Error, _on_ovis2_error)
    app.add_exception_handler(EngineOverloadedError, _on_overloaded)
    app.add_exception_handler(EngineDeadError, _on_engine_dead)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
