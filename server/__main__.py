"""`ovis2-serve` / `python -m server`: one flag per ServerSettings field, each also an OVIS2_* variable."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
import types
import typing

from pydantic import ValidationError

from .malloc_policy import limit_malloc_arenas
from .settings import ServerSettings

DESCRIPTION = """OpenAI-compatible server for Ovis2 vision-language models.

Every flag can also be set with an environment variable: --max-num-seqs 8 is OVIS2_MAX_NUM_SEQS=8.
Flags given on the command line win over the environment. List flags take comma-separated values."""


def _flag_kind(annotation: object) -> str:
    """'bool', 'list' or 'value' for a settings field's type."""
    args = typing.get_args(annotation)
    if annotation is bool:
        return "bool"
    origin = typing.get_origin(annotation)
    if origin is list or (origin is typing.Annotated and typing.get_origin(args[0]) is list):
        return "list"
    if origin in (typing.Union, types.UnionType) and bool in args:
        return "bool"
    return "value"


def _metavar(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(typing.get_args(annotation)) + "}"
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(args[0]) is typing.Literal:
        return "{" + ",".join(typing.get_args(args[0])) + "}"
    return {int: "N", float: "X"}.get(args[0], "TEXT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovis2-serve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        text = f"{field.description} [env: {_variable(name)}; default: {shown}]"
        kind = _flag_kind(field.annotation)
        if kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            metavar = "A,B,..." if kind == "list" else _metavar(field.annotation)
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=text)
    return parser


def load_settings(argv: list[str] | None = None) -> ServerSettings:
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    for line in misspelt_variables(os.environ):
        print(f"{parser.prog}: warning: {line}", file=sys.stderr)
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(_problem(error, given) for error in exc.errors())
        print(f"{parser.prog}: error: {problems} (--help lists the flags)", file=sys.stderr)
        raise SystemExit(2) from None


def misspelt_variables(environ) -> list[str]:
    """An OVIS2_* variable that is no setting but nearly one's name (a setting silently left at its default);
    the project's other OVIS2_* switches are not near any."""
    settings = [_variable(name) for name in ServerSettings.model_fields]
    found = []
    for variable in sorted(v for v in environ if v.startswith("OVIS2_") and v not in settings):
        close = difflib.get_close_matches(variable, settings, n=1, cutoff=0.85)
        if close:
            found.append(f"{variable} is not a setting and is ignored; did you mean {close[0]}?")
    return found


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _variable(name: str) -> str:
    return ServerSettings.model_config["env_prefix"] + name.upper()


def _source(name: str, given: dict) -> str:
    """Where a setting came from: its flag, or its OVIS2_* variable when the flag was not given."""
    variable = _variable(name)
    return variable if name not in given and variable in os.environ else _flag(name)


def _problem(error: dict, given: dict) -> str:
    """'--flag: message' (or 'OVIS2_VARIABLE: message'); a check across settings has no location, so the settings
    it names become flags."""
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"{_source('_'.join(str(p) for p in error['loc']), given)}: {message}"
    return _SETTING_NAME.sub(lambda match: _flag(match.group(0)), message)


_SETTING_NAME = re.compile(
    r"\b(" + "|".join(sorted(ServerSettings.model_fields, key=len, reverse=True)) + r")\b"
)


def find_checkpoint(settings: ServerSettings) -> None:
    """Resolve (and download) the checkpoint before the server starts, so a name that cannot be used is one line."""
    from ovis2 import Ovis2Error, Ovis2ForConditionalGeneration, resolve_checkpoint

    try:
        resolve_checkpoint(settings.model, model_class=Ovis2ForConditionalGeneration)
    except Ovis2Error as error:
        print(f"ovis2-serve: error: --model: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    limit_malloc_arenas(settings.malloc_arena_max)
    sockets = _bound_sockets(settings)
    find_checkpoint(settings)
    import uvicorn

    from .app import SHUTDOWN_MARGIN_SECONDS, create_app
    from .startup import StartupOutcome, urls_of

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    outcome = StartupOutcome(app)
    config = uvicorn.Config(
        outcome,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # past the grace period the app fails what is still running with 503s (app.stop_after_grace): uvicorn
        # waits a little longer, so that those answers go out before it cancels what remains
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + SHUTDOWN_MARGIN_SECONDS,
    )
    server = uvicorn.Server(config)
    app.state.server.exit_requested = lambda: server.should_exit
    # uvicorn re-raises the signal that stopped it after its graceful shutdown; with these handlers in place that
    # re-raise is a no-op, so SIGTERM ends in exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    app.state.server.listening_on = urls_of(sockets)
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's exit for a failed start-up
        if outcome.error is None and not outcome.stopped:
            raise
    except OSError as error:  # another server bound the address meanwhile and listened first
        print(f"ovis2-serve: error: --host/--port: cannot listen: {error.strerror or error}", file=sys.stderr)
        return 2
    return _exit_status(server, outcome)


def _bound_sockets(settings: ServerSettings):
    from .startup import Ovis2Error, bound_sockets

    try:
        return bound_sockets(settings.host, settings.port)
    except Ovis2Error as error:
        print(f"ovis2-serve: error: --host/--port: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _exit_status(server, outcome) -> int:
    if outcome.error is not None:
        print(f"ovis2-serve: error: {outcome.error}", file=sys.stderr)
        return 2
    if outcome.stopped:  # the model may still be loading in its thread: no interpreter shutdown around it
        print("ovis2-serve: stopped while loading the model", file=sys.stderr)
        sys.stderr.flush()
        os._exit(0)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
