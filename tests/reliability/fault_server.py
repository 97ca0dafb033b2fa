"""`python -m server` with one test-only fault: a request whose `seed` is FAULT_SEED raises inside the engine.

Used only by tests/reliability: the hook is the engine's documented `AsyncEngine.set_request_hook` (it runs when
a request is scheduled, in the engine thread), installed here by wrapping `create_app`; production code has no
switch for it. Run as `python -m tests.reliability.fault_server <server flags>`.
"""

from __future__ import annotations

import sys

FAULT_SEED = 7_000_007


def _hook(group) -> None:
    if group.params.seed == FAULT_SEED:
        raise RuntimeError("injected fault (secret internal detail)")


def main(argv: list[str] | None = None) -> int:
    import server.app
    from ovis2 import AsyncEngine, EngineArgs
    from server.__main__ import main as serve

    class FaultInjectingEngine(AsyncEngine):
        async def start(self) -> None:
            await super().start()
            self.set_request_hook(_hook)

    real_create_app = server.app.create_app

    def create_app(settings=None, engine=None):
        engine = engine or FaultInjectingEngine(EngineArgs(**settings.engine_args_kwargs()))
        return real_create_app(settings, engine)

    server.app.create_app = create_app  # server.__main__.main imports it from server.app at call time
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
