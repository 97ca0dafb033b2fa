"""A callback the engine's loop thread runs once per busy spell, when it has had no work for a quiet while
(the server hands freed memory back to the system then)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class IdleHook:
    """`stepped()` after each step sets the deadline; `ask()` (from any thread: a flag) and then the loop's
    `take_ask()` set one without a step, never later than one already set; `wait(wake)` runs the hook when the
    deadline has passed, then waits for `wake`. All but `ask()` run on the loop thread."""

    def __init__(self) -> None:
        self.hook: Callable[[], None] | None = None
        self.quiet_seconds = 0.0
        self._due: float | None = None  # when the hook runs if no work comes before; None: not due
        self._asked = False

    def set(self, hook: Callable[[], None] | None, quiet_seconds: float) -> None:
        self.hook, self.quiet_seconds = hook, quiet_seconds

    def ask(self) -> None:
        self._asked = True

    def stepped(self) -> None:
        self._due = time.monotonic() + self.quiet_seconds

    def take_ask(self) -> None:
        if self._asked:
            self._asked = False
            self._due = self._due or time.monotonic() + self.quiet_seconds

    def wait(self, wake: threading.Event) -> None:
        """Runs the hook if it is due, then waits for `wake` (at most a second, or until the hook is due)."""
        now = time.monotonic()
        if self._due is not None and now >= self._due:
            self._run()
            self._due = None
        wake.wait(timeout=1.0 if self._due is None else min(1.0, self._due - now))
        wake.clear()

    def _run(self) -> None:
        if self.hook is None:
            return
        try:
            self.hook()
        except Exception:  # noqa: BLE001 - the hook's failure is not the engine's
            logger.exception("the engine's idle hook failed")
