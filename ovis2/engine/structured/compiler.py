"""Compiling constraints into Grammars: off the engine loop, once per constraint.

`submit(params)` returns a Future: done at once when the constraint is cached (a bounded LRU), shared when the
same constraint is being compiled, else compiled in this compiler's own threads (xgrammar releases the GIL while
it compiles, so neither the event loop nor the engine loop waits). Errors come back as StructuredOutputError
with xgrammar's reason. The token tables are built on first use (about two seconds each for Qwen2.5's).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ...errors import StructuredOutputError
from .grammar import WHAT, Grammar
from .params import StructuredOutputsParams
from .schema_support import unenforced_feature
from .vocabulary import grammar_vocabulary, json_vocabulary

MAX_CACHE_BYTES = 512 * 2**20  # the cache also stops at this many bytes of compiled grammars (0.1-3 MB each)
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


@dataclass
class GrammarStats:
    num_compiles: int = 0
    compile_seconds: float = 0.0  # summed over num_compiles
    num_cache_hits: int = 0  # served from the cache, or from a compile already under way
    num_compile_errors: int = 0


class GrammarCompiler:
    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        cache_size: int = 128,
        num_threads: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._cache_size = cache_size
        self._num_threads = num_threads or min(8, os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self._vocabularies: dict[str, object] = {}  # "text" / "json": xgrammar.TokenizerInfo
        self._backends: dict[str, object] = {}  # the same keys: xgrammar.GrammarCompiler
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        # constraints refused (cannot be compiled, or match nothing) -> the reason: a repeat costs no compile
        self._refused: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._pending: dict[tuple[str, str], Future] = {}
        self._waiters: dict[tuple[str, str], int] = {}  # of each pending compile: submits not yet withdrawn
        self._pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="ovis2-grammar", initializer=_yield_to_the_engine
        )
        self.stats = GrammarStats()

    def submit(self, params: StructuredOutputsParams) -> Future:
        """-> Future[Grammar]; its exception is a StructuredOutputError when the constraint cannot be compiled."""
        key = params.cache_key
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self.stats.num_cache_hits += 1
                return _done(grammar)
            future = self._pending.get(key)
            if future is not None:
                self.stats.num_cache_hits += 1
                self._waiters[key] += 1
                return future
            reason = self._refused.get(key)
            if reason is not None:
                self._refused.move_to_end(key)
                self.stats.num_cache_hits += 1
                return _failed(StructuredOutputError(reason))
            future = self._pending[key] = self._pool.submit(self._compile, params)
            self._waiters[key] = 1
            return future

    def withdraw(self, params: StructuredOutputsParams, future: Future) -> None:
        """The caller of `submit(params)`, which returned `future`, no longer waits for it: when no one else does
        and the compile has not begun, it never runs (a client that sends a costly constraint and leaves costs
        nothing)."""
        key = params.cache_key
        with self._lock:
            if self._pending.get(key) is not future:
                return
            self._waiters[key] -= 1
            if self._waiters[key] == 0 and self._pending[key].cancel():
                del self._pending[key], self._waiters[key]

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """Blocking `submit`: for offline use, never on the engine loop."""
        return self.submit(params).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- in the compiler's threads
    def _compile(self, params: StructuredOutputsParams) -> Grammar:
        key = params.cache_key
        try:
            backend = self._get_backend("json" if params.kind in ("json", "json_object") else "text")
            start = time.perf_counter()
            grammar = Grammar(_compile_with(backend, params), params.kind, time.perf_counter() - start)
            _check_something_matches(grammar, params.kind, self._stop_token_ids)
        except BaseException as error:
            with self._lock:
                self._forget_pending(key)
                self.stats.num_compile_errors += 1
                if isinstance(error, StructuredOutputError):
                    self._remember_refusal(key, str(error))
            raise
        with self._lock:
            self._forget_pending(key)
            self._store(key, grammar)
            self.stats.num_compiles += 1
            self.stats.compile_seconds += grammar.compile_seconds
        return grammar

    def _store(self, key: tuple[str, str], grammar: Grammar) -> None:
        if self._cache_size <= 0:
            return
        self._cache[key] = grammar
        while len(self._cache) > self._cache_size or (
            len(self._cache) > 1 and self.cache_bytes > MAX_CACHE_BYTES
        ):
            self._cache.popitem(last=False)

    def _forget_pending(self, key: tuple[str, str]) -> None:
        self._pending.pop(key, None)
        self._waiters.pop(key, None)

    def _remember_refusal(self, key: tuple[str, str], reason: str) -> None:
        if self._cache_size <= 0:
            return
        self._refused[key] = reason
        while len(self._refused) > self._cache_size:
            self._refused.popitem(last=False)

    @property
    def cache_bytes(self) -> int:
        return sum(grammar.memory_bytes for grammar in self._cache.values())

    def _get_backend(self, table: str):
        """The xgrammar compiler over the "text" or the "json" token table (vocabulary.py), built on first use."""
        with self._backend_lock:
            if table not in self._backends:
                import xgrammar as xgr

                self._backends[table] = xgr.GrammarCompiler(
                    self._vocabulary(table), max_threads=self._num_threads, cache_enabled=False
                )
            return self._backends[table]

    def _vocabulary(self, table: str):
        if "text" not in self._vocabularies:
            self._vocabularies["text"] = grammar_vocabulary(
                self._tokenizer, self._vocab_size, self._stop_token_ids
            )
        if table not in self._vocabularies:
            self._vocabularies[table] = json_vocabulary(self._vocabularies["text"])
        return self._vocabularies[table]


def _yield_to_the_engine() -> None:
    """Run this compile thread, and the threads xgrammar starts from it (they inherit it), 10 nice steps below the
    engine on Linux, where a thread's nice value is its own: a schema that takes seconds to compile uses the CPU the
    engine leaves instead of starving its decode steps (2 cores, two 400-deep schemas compiling: a 400-token stream
    0.9 -> 11.2 s at equal priority, 0.9 -> 1.7 s so). Elsewhere, or where it is refused, compiles keep the
    process's priority."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + 10))
    except (AttributeError, OSError):
        pass


def _check_something_matches(grammar: Grammar, kind: str, stop_token_ids) -> None:
    """A StructuredOutputError for a constraint no text satisfies (`root ::= root`, the regex `[^\\s\\S]`): it
    compiles, but its first step would allow no token at all."""
    if grammar.matcher(stop_token_ids).allows_nothing():
        raise StructuredOutputError(f"the {WHAT[kind]} matches no text: nothing can be generated under it")


def _compile_with(backend, params: StructuredOutputsParams):
    kind = params.kind
    if kind == "json":
        problem = unenforced_feature(params.schema)
        if problem is not None:
            raise StructuredOutputError(f"the JSON schema at {problem}")
    try:
        if kind in ("json", "json_object"):  # compact JSON: no free whitespace a model could pad forever
            return backend.compile_json_schema(
                params.source, any_whitespace=False, separators=(",", ":"), strict_mode=kind == "json"
            )
        if kind == "regex":
            return backend.compile_regex(params.regex)
        return backend.compile_grammar(choice_grammar(params.choice) if kind == "choice" else params.grammar)
    except MemoryError:  # not the constraint's fault: not a refusal (refusals are cached)
        raise
    except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError (and subclasses) with its reason
        raise StructuredOutputError(f"the {WHAT[kind]} cannot be compiled: {library_reason(error)}") from None


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF for exactly one of `choices` (JSON string escapes are also EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


def library_reason(error: Exception) -> str:
    """xgrammar's message without its log prefix (time, C++ file and line)."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in str(error).splitlines()]
    return next((line for line in lines if line), type(error).__name__)


def _done(grammar: Grammar) -> Future:
    future: Future = Future()
    future.set_result(grammar)
    return future


def _failed(error: Exception) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future
