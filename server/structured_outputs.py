"""A request's structured-output fields -> the engine's StructuredOutputsParams, remembering which field it came
from, so that a constraint the engine cannot compile is a 400 naming that field."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .engine_api import StructuredOutputError, StructuredOutputsParams
from .errors import bad_request
from .protocol.structured import StructuredOutputsExtensions
from .request_flow import RequestRefused
from .state import ServerState

T = TypeVar("T")
GUIDED = ("json", "regex", "choice", "grammar")


@dataclass
class Constraint:
    params: StructuredOutputsParams
    param: (
        str  # the request field it came from: "response_format", "structured_outputs.regex", "guided_json"...
    )

    @classmethod
    def build(cls, param: str, **values: Any) -> Constraint:
        try:
            return cls(StructuredOutputsParams(**values), param)
        except StructuredOutputError as error:
            raise bad_request(str(error), param) from None


def requested_constraint(request: StructuredOutputsExtensions) -> Constraint | None:
    """The one constraint a chat or completions request asks for, or None; a 400 for two or a malformed one."""
    found = list(_sources(request))
    if len(found) > 1:
        raise bad_request(
            f"ask for one structured output, not both {found[0][0]} and {found[1][0]}", found[1][0]
        )
    return Constraint.build(found[0][0], **found[0][1]) if found else None


def _sources(request: StructuredOutputsExtensions) -> Iterator[tuple[str, dict[str, Any]]]:
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        yield "response_format", {"json_object": True}
    if response_format is not None and response_format.type == "json_schema":
        yield "response_format.json_schema.schema", {"json": response_format.json_schema.schema_}
    wanted = request.structured_outputs
    if wanted is not None:
        given = {
            "json": wanted.json_,
            "regex": wanted.regex,
            "choice": wanted.choice,
            "grammar": wanted.grammar,
            "json_object": wanted.json_object or None,
        }
        given = {kind: value for kind, value in given.items() if value is not None}
        if not given:
            yield "structured_outputs", {}
        yield from ((f"structured_outputs.{kind}", {kind: value}) for kind, value in given.items())
    for kind in GUIDED:
        value = getattr(request, f"guided_{kind}")
        if value is not None:
            yield f"guided_{kind}", {kind: value}


def constraint_param(constraint: Constraint | None) -> str | None:
    """The request field a constraint came from, to name in its errors."""
    return constraint.param if constraint is not None else None


async def constrained(state: ServerState, constraint: Constraint | None, work: Awaitable[T]) -> T:
    """Await the response; counts a structured request, and makes a compile failure a 400 naming its field."""
    if constraint is None:
        return await work
    state.metrics.count(state.metrics.structured_requests, 1, kind=constraint.params.kind)
    try:
        return await work
    except StructuredOutputError as error:
        raise bad_request(str(error), constraint.param) from None
    except RequestRefused as error:  # the constraint dead-ended while generating
        error.param = error.param or constraint.param
        raise
