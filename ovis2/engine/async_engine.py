"""The engine for asyncio servers: the step loop runs in its own thread, outputs flow back per request.

`generate()` is an async generator of incremental RequestOutputs; a consumer that stops early (client
gone, task cancelled) aborts its request in one place, its `finally`. Requests in and aborts go to the
loop thread through a command queue; outputs come back through `loop.call_soon_threadsafe` into one
output stream per request, where outputs a slow consumer has not read yet merge into one. An error
inside one request fails that request only; an error in the loop itself marks the engine dead, fails
every open request and makes `check_health()` raise; `shutdown()` fails the requests still open.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

from ..errors import Ovis2Error
from ..inputs import EngineInputs
from .engine_args import EngineArgs
from .engine_stats import EngineStats
from .idle_hook import IdleHook
from .input_processor import load_processor
from .llm_engine import LLMEngine
from .output_stream import OutputStream
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .sequence import SequenceGroup
from .structured.grammar import Grammar

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an unexpected error; the server must restart."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; retry later (the server answers 503/429)."""


class AsyncEngine:
    def __init__(
        self, args: EngineArgs | None = None, engine: LLMEngine | None = None, processor=None
    ) -> None:
        self.args = args or (engine.args if engine is not None else EngineArgs())
        self.engine = engine
        self._processor = processor
        self._commands: deque[tuple] = deque()
        self._wake = threading.Event()
        self._queues: dict[str, OutputStream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._num_pending_adds = 0
        self._num_compiling = 0  # requests waiting for their grammar, not yet sent to the loop
        self._idle_hook = IdleHook()

    # --- lifecycle
    async def start(self) -> None:
        """Builds the engine (unless given one) in the loop thread, which then runs every step: the model's
        compute stays on one thread, so one OpenMP thread team serves it. (libgomp gives each calling thread a
        team of its own; with more teams than cores it stops spinning between parallel regions, and every op
        pays a wake-up: +15-20% per decode step measured on 2 cores.)"""
        self._loop = asyncio.get_running_loop()
        built = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(built,), name="ovis2-engine", daemon=True
        )
        self._thread.start()
        await built

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        # the requests hear of it now, not after the step in progress (a long prefill on a CPU); none registers
        # later: check_health refuses from here on
        self._fail_all(EngineDeadError("the engine is shut down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None
        if self.engine is not None:
            self.engine.input_processor.close()

    # --- the public interface
    @property
    def processor(self):
        if self.engine is not None:
            return self.engine.processor
        if self._processor is None:  # before start(): the one the engine will use
            self._processor = load_processor(self.args)
        return self._processor

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return str(self.args.model)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def dtype_name(self) -> str:
        return self.engine.dtype_name

    @property
    def stats(self) -> EngineStats:
        stats = self.engine.stats
        stats.num_waiting += self._num_waiting_outside
        return stats

    @property
    def _num_waiting_outside(self) -> int:
        """Requests accepted but not yet in the scheduler's queue: compiling their grammar, or being added."""
        return self._num_compiling + self._num_pending_adds

    def check_capacity(self) -> None:
        """EngineOverloadedError when the waiting queue is full: callers may check before costly preprocessing;
        `generate` checks again."""
        waiting = self.engine.core.scheduler.num_waiting + self._num_waiting_outside
        if waiting >= self.args.max_waiting_requests:
            raise EngineOverloadedError(f"{self.args.max_waiting_requests} requests are already waiting")

    def check_health(self) -> None:
        if self._stopping:
            raise EngineDeadError("the engine is shut down")
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")

    def set_idle_hook(self, hook: Callable[[], None] | None, quiet_seconds: float = 0.0) -> None:
        """`hook()` runs on the loop thread once per busy spell, when the engine has had no work for
        `quiet_seconds` after its last step; an exception in it is logged and the loop goes on."""
        self._idle_hook.set(hook, quiet_seconds)

    def request_idle_hook(self) -> None:
        """Run the idle hook after its quiet time even if no step comes first: memory was freed outside the
        engine (a request that failed while its media loaded never reaches a step). A hook already due is not
        put off; asks while the loop is stopped do nothing."""
        if self._stopping or self._dead is not None:
            return
        self._idle_hook.ask()
        self._wake.set()

    def set_request_hook(self, hook: Callable[[SequenceGroup], None] | None) -> None:
        """Fault injection for tests: hook(group) runs when a request is scheduled; raising fails it."""
        self.engine.core.request_hook = hook

    async def generate(
        self, inputs: EngineInputs, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        self.check_health()
        self.engine.validate(inputs, params)  # user errors raise here, before anything is queued
        if request_id in self._queues:
            raise Ovis2Error(f"request id {request_id!r} is already running")
        self.check_capacity()
        grammar = await self.compile_grammar(
            params
        )  # in the compiler's threads; a bad constraint raises here
        self.check_health()  # the engine may have stopped meanwhile
        queue = OutputStream()
        self._queues[request_id] = queue
        self._num_pending_adds += 1
        self._send(("add", request_id, inputs, params, grammar))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def compile_grammar(self, params: SamplingParams) -> Grammar | None:
        """params.structured_outputs compiled (or from the cache), off both the event loop and the engine loop;
        None when the request is not structured. Raises StructuredOutputError for a constraint that cannot be
        compiled."""
        if params.structured_outputs is None:
            return None
        grammars = self.engine.input_processor.grammars
        # shielded: the compile may be shared, and cancelling the wrapper would cancel it for every sharer
        submitted = grammars.submit(params.structured_outputs)
        self._num_compiling += 1
        try:
            return await asyncio.shield(asyncio.wrap_future(submitted))
        except asyncio.CancelledError:
            # cancelled without this task being cancelled: shutdown closed the compiler
            if submitted.cancelled() and not asyncio.current_task().cancelling():
                raise EngineDeadError("the engine is shut down") from None
            grammars.withdraw(params.structured_outputs, submitted)
            raise
        finally:
            self._num_compiling -= 1

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    # --- the loop thread
    def _send(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    def _thread_main(self, built: asyncio.Future) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(self.args, processor=self._processor)
        except BaseException as error:  # noqa: BLE001 - start() raises it
            self._dead = error
            self._loop.call_soon_threadsafe(_settle, built, error)
            return
        self._loop.call_soon_threadsafe(_settle, built, None)
        self._run_loop()

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                self._idle_hook.take_ask()
                if not self.engine.has_unfinished_requests:
                    self._idle_hook.wait(self._wake)
                    continue
                outputs = self.engine.step()
                self._idle_hook.stepped()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as error:  # noqa: BLE001 - anything here is fatal: report, never hang clients
            logger.exception("engine loop died")
            self._dead = error
            self._loop.call_soon_threadsafe(
                self._fail_all, EngineDeadError(f"the engine loop died: {error!r}")
            )

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(command[1])

    def _add(
        self, request_id: str, inputs: EngineInputs, params: SamplingParams, grammar: Grammar | None
    ) -> None:
        self._num_pending_adds -= 1
        try:
            self.engine.add_request(request_id, inputs, params, grammar=grammar)
        except Exception as error:  # noqa: BLE001 - a request that cannot start fails alone
            self._loop.call_soon_threadsafe(self._deliver_error, request_id, error)

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort_request(request_id)
        if output is not None:
            self._loop.call_soon_threadsafe(self._dispatch, [output])

    # --- on the event loop
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _deliver_error(self, request_id: str, error: Exception) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(error)

    def _fail_all(self, error: Exception) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # start() was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
