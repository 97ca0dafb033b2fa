"""The structured-output pieces one by one: the constraint's own checks, the token tables, the bitmask, the
compiler's cache and its sharing of compiles, and a slow compile next to a running batch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time

import pytest
import torch

from ovis2.engine.async_engine import AsyncEngine, EngineDeadError
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.structured.bitmask import apply_grammar_bitmask
from ovis2.engine.structured.compiler import GrammarCompiler, choice_grammar
from ovis2.engine.structured.params import MAX_CONSTRAINT_CHARS, StructuredOutputsParams
from ovis2.engine.structured.schema_limits import MAX_OPTIONAL_PROPERTIES, MAX_SCHEMA_DEPTH
from ovis2.errors import StructuredOutputError
from ovis2.tokenizer import DEFAULT_EOS_IDS, FIRST_ADDED_TOKEN_ID, VISUAL_INDICATOR_IDS
from tests.engine.prompts import chat_prompt, text_ids

NUM_TOKENIZER_IDS = VISUAL_INDICATOR_IDS[-1] + 1  # the model's vocabulary goes on past these: padding


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"choice": []}, "1 to"),
        ({"choice": ["a", ""]}, "non-empty"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": False}, "no output satisfies"),
        ({"json": [1]}, "must be a JSON schema"),
        ({"json_object": False}, "exactly one"),
        ({"grammar": "  "}, "non-empty"),
        ({"regex": "a" * (MAX_CONSTRAINT_CHARS + 1)}, "at most"),
    ],
)
def test_a_malformed_constraint_is_refused_by_name(values, problem):
    with pytest.raises(StructuredOutputError, match=problem):
        StructuredOutputsParams(**values)


def nested_arrays(levels: int) -> str:
    """A schema of `levels` arrays in arrays around an integer: levels + 1 nested JSON objects."""
    return '{"type":"array","items":' * levels + '{"type":"integer"}' + "}" * levels


def properties(count: int, required: int = 0) -> dict:
    names = [f"p{i}" for i in range(count)]
    return {
        "type": "object",
        "properties": dict.fromkeys(names, {"type": "integer"}),
        "required": names[:required],
    }


def test_schemas_whose_compile_time_grows_with_the_cube_are_capped():
    """Deep nesting and many optional properties: xgrammar took 114 s for 1200 levels, 29 s for 3000 properties."""
    StructuredOutputsParams(json=nested_arrays(MAX_SCHEMA_DEPTH - 1))
    with pytest.raises(
        StructuredOutputError, match=f"deeper than {MAX_SCHEMA_DEPTH} levels at #/items/items"
    ):
        StructuredOutputsParams(json=nested_arrays(MAX_SCHEMA_DEPTH))
    deep_data = json.loads(nested_arrays(900))
    with pytest.raises(StructuredOutputError, match="deeper than"):  # the check itself survives any depth
        StructuredOutputsParams(json=deep_data)
    with pytest.raises(StructuredOutputError, match="too deep to read"):  # deeper than Python's parser goes
        StructuredOutputsParams(json=nested_arrays(5000))
    StructuredOutputsParams(json=properties(MAX_OPTIONAL_PROPERTIES))
    StructuredOutputsParams(json=properties(MAX_OPTIONAL_PROPERTIES + 100, required=100))
    nested = {"type": "object", "properties": {"inner": properties(MAX_OPTIONAL_PROPERTIES + 1)}}
    with pytest.raises(StructuredOutputError, match="513 optional properties at #/properties/inner;"):
        StructuredOutputsParams(json=nested)


def test_the_cache_key_keeps_a_schemas_property_order():
    first = StructuredOutputsParams(json={"properties": {"b": {}, "a": {}}})
    second = StructuredOutputsParams(json='{"properties": {"a": {}, "b": {}}}')
    assert first.cache_key != second.cache_key and first.kind == second.kind == "json"
    assert StructuredOutputsParams(json='{"type": "integer"}').cache_key == ("json", '{"type":"integer"}')


def allowed_after(grammars: GrammarCompiler, params: StructuredOutputsParams, text: str) -> torch.Tensor:
    """[V] bool: the tokens the grammar allows after `text`, through the engine's own bitmask step."""
    matcher = grammars.compile(params).matcher(DEFAULT_EOS_IDS)
    assert matcher._matcher.accept_string(text)
    logits = torch.zeros(2, grammars._vocab_size)
    apply_grammar_bitmask(logits, [None, matcher])
    assert bool((logits[0] == 0).all())  # the unconstrained row is left alone
    return logits[1] == 0


def test_the_bitmask_spans_the_models_vocabulary_and_never_allows_padding_or_control_tokens(
    grammars, tokenizer
):
    inside = allowed_after(grammars, StructuredOutputsParams(regex=r'"[^"]*"'), '"')
    assert inside.shape == (151936,) and grammars._vocab_size > NUM_TOKENIZER_IDS
    assert not inside[NUM_TOKENIZER_IDS:].any()  # the model's padding ids
    assert not inside[
        FIRST_ADDED_TOKEN_ID:NUM_TOKENIZER_IDS
    ].any()  # <|im_start|>, image tokens, eos before the end
    assert inside[tokenizer.convert_tokens_to_ids("hello")] and inside.sum() > 100_000
    done = allowed_after(grammars, StructuredOutputsParams(regex=r'"[^"]*"'), '"a"')
    assert sorted(done.nonzero().flatten().tolist()) == sorted(DEFAULT_EOS_IDS)  # complete: only eos


def test_json_grammars_never_allow_a_raw_control_character(grammars, tokenizer):
    """xgrammar 0.2.9 lets maxLength strings take a raw tab; the JSON token table has no such token."""
    bounded = StructuredOutputsParams(json={"type": "string", "maxLength": 8})
    inside = allowed_after(grammars, bounded, '"ab')
    tab, newline, word = (tokenizer.convert_tokens_to_ids(t) for t in ("\u0109", "\u010a", "hello"))
    assert not inside[tab] and not inside[newline] and inside[word]
    assert allowed_after(grammars, StructuredOutputsParams(regex="a\tb|a\nb"), "a")[[tab, newline]].all()


def test_choices_with_quotes_newlines_and_unicode_match_exactly(grammars):
    choices = ['say "hi"', "line\nbreak", "back\\slash", "ünï"]
    grammar = grammars.compile(StructuredOutputsParams(choice=choices))
    for choice in choices:
        matcher = grammar.matcher(DEFAULT_EOS_IDS)
        assert matcher._matcher.accept_string(choice) and matcher.is_completed, choice
    assert not grammar.matcher(DEFAULT_EOS_IDS)._matcher.accept_string("say hi")
    assert choice_grammar(["a"]) == 'root ::= "a"'


def fresh_compiler(grammars, **options) -> GrammarCompiler:
    """A compiler with its own cache and counters over the session compiler's token tables (built once)."""
    compiler = GrammarCompiler(None, grammars._vocab_size, DEFAULT_EOS_IDS, **options)
    compiler._get_backend = grammars._get_backend
    return compiler


def test_each_constraint_compiles_once_and_the_cache_is_bounded(grammars):
    compiler = fresh_compiler(grammars, cache_size=2)
    regexes = [StructuredOutputsParams(regex=f"{letter}+") for letter in "abc"]
    first = compiler.compile(regexes[0])
    assert compiler.compile(StructuredOutputsParams(regex="a+")) is first
    assert (compiler.stats.num_compiles, compiler.stats.num_cache_hits) == (1, 1)
    compiler.compile(regexes[1])
    compiler.compile(regexes[2])  # evicts a+, the least recently used
    assert compiler.compile(regexes[0]) is not first and compiler.stats.num_compiles == 4
    assert compiler.stats.compile_seconds > 0
    with pytest.raises(StructuredOutputError):
        compiler.compile(StructuredOutputsParams(regex="(a"))
    assert compiler.stats.num_compile_errors == 1
    compiler.close()


@pytest.mark.parametrize(("constraint", "reason"), [("(a", "not closed"), ("[^\\s\\S]", "matches no text")])
def test_a_refused_constraint_is_refused_again_from_the_cache_without_compiling(grammars, constraint, reason):
    counting = CountingBackend(grammars._get_backend("text"))
    compiler = fresh_compiler(grammars, cache_size=2)
    compiler._get_backend = lambda table: counting
    errors = []
    for _ in range(3):
        with pytest.raises(StructuredOutputError, match=re.escape(reason)) as caught:
            compiler.compile(StructuredOutputsParams(regex=constraint))
        errors.append(str(caught.value))
    assert len(set(errors)) == 1 and counting.calls == 1
    assert (compiler.stats.num_compile_errors, compiler.stats.num_cache_hits) == (1, 2)
    for letter in "xy":  # the refusals are bounded like the grammars: two more push this one out
        with pytest.raises(StructuredOutputError):
            compiler.compile(StructuredOutputsParams(regex=f"({letter}"))
    with pytest.raises(StructuredOutputError):
        compiler.compile(StructuredOutputsParams(regex=constraint))
    assert counting.calls == 4
    compiler.close()


class CountingBackend:
    """An xgrammar compiler stand-in that counts its regex compiles."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, 0

    def compile_regex(self, regex: str):
        self.calls += 1
        return self.backend.compile_regex(regex)


def test_the_cache_also_stops_at_a_byte_budget(grammars, monkeypatch):
    from ovis2.engine.structured import compiler as compiler_module

    compiler = fresh_compiler(grammars, cache_size=100)
    first = compiler.compile(StructuredOutputsParams(regex="q+"))
    monkeypatch.setattr(compiler_module, "MAX_CACHE_BYTES", first.memory_bytes + 1)
    second = compiler.compile(StructuredOutputsParams(regex="r+"))
    assert list(compiler._cache.values()) == [second]  # the newest stays, even alone over the budget
    assert (
        compiler.compile(StructuredOutputsParams(regex="q+")) is not first
    )  # evicted by bytes, not by count
    compiler.close()


class SlowBackend:
    """An xgrammar compiler stand-in whose compile waits until `release` is set."""

    def __init__(self, backend) -> None:
        self.backend, self.release, self.calls = backend, threading.Event(), 0

    def compile_regex(self, regex: str):
        self.calls += 1
        assert self.release.wait(60)
        return self.backend.compile_regex(regex)


def slow_compiler(grammars) -> tuple[SlowBackend, object]:
    """A fresh compiler whose compiles wait for the SlowBackend's release."""
    slow = SlowBackend(grammars._get_backend("text"))
    compiler = fresh_compiler(grammars)
    compiler._get_backend = lambda table: slow
    return slow, compiler


def test_requests_for_a_constraint_being_compiled_share_that_compile(grammars):
    slow, compiler = slow_compiler(grammars)
    futures = [compiler.submit(StructuredOutputsParams(regex="x{2}")) for _ in range(3)]
    assert futures[0] is futures[1] is futures[2] and not futures[0].done()
    slow.release.set()
    assert futures[0].result(60) is compiler.compile(StructuredOutputsParams(regex="x{2}"))
    assert slow.calls == 1 and compiler.stats.num_cache_hits == 3
    compiler.close()


def test_a_slow_compile_never_stalls_the_requests_already_running(make_engine, grammars):
    slow, compiler = slow_compiler(grammars)

    async def main():
        engine = AsyncEngine(engine=make_engine(grammars=compiler))
        await engine.start()
        structured = SamplingParams(max_tokens=10, seed=1, structured_outputs={"regex": "[a-z]{3}"})
        waiting = asyncio.create_task(collect(engine, "slow", structured))
        free = await collect(engine, "free", SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0))
        compiling = not waiting.done() and slow.calls == 1
        slow.release.set()
        answer = await waiting
        await engine.shutdown()
        return free, compiling, answer

    free, compiling, answer = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert (
        compiling and len(free.outputs[0].token_ids) == 12
    )  # finished while the grammar was still compiling
    assert len(answer.outputs[0].text) == 3 and answer.outputs[0].text.isalpha()
    compiler.close()


def test_a_request_that_leaves_while_its_shared_compile_waits_its_turn_harms_no_other(make_engine, grammars):
    """Both compile threads busy; two requests wait for one queued compile and the first leaves: the compile
    still runs for the second, and later requests for it are served. A queued compile whose only request left
    never runs."""
    slow, compiler = slow_compiler(grammars)
    regex = {"regex": "[a-z]{3}"}

    async def main():
        engine = AsyncEngine(engine=make_engine(grammars=compiler))
        await engine.start()
        busy = [compiler.submit(StructuredOutputsParams(regex=f"{letter}{{2}}")) for letter in "pq"]
        params = SamplingParams(max_tokens=10, seed=1, structured_outputs=regex)
        leaving = asyncio.create_task(collect(engine, "leaving", params))
        staying = asyncio.create_task(collect(engine, "staying", params))
        alone = SamplingParams(max_tokens=10, structured_outputs={"regex": "[0-9]{2}"})
        leaving_alone = asyncio.create_task(collect(engine, "leaving alone", alone))
        await asyncio.sleep(0.2)
        queued = (
            slow.calls == 2 and not compiler._pending[StructuredOutputsParams(**regex).cache_key].running()
        )
        waiting = engine.stats.num_waiting
        leaving.cancel()
        leaving_alone.cancel()
        await asyncio.sleep(0.1)
        slow.release.set()
        answers = [await staying, await collect(engine, "later", params)]
        await engine.shutdown()
        return queued, waiting, [future.result(60) for future in busy], answers

    queued, waiting, _, answers = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert queued and waiting == 3  # the requests waiting for their grammar count as waiting
    # p, q and the shared compile ran; the one only the leaving request waited for never did
    assert slow.calls == 3 and not compiler._pending
    for answer in answers:
        assert answer.error is None and len(answer.outputs[0].text) == 3 and answer.outputs[0].text.isalpha()
    compiler.close()


def test_a_request_whose_compile_is_queued_when_the_engine_stops_is_told_the_engine_stopped(
    make_engine, grammars
):
    slow, compiler = slow_compiler(grammars)

    async def main():
        engine = AsyncEngine(engine=make_engine(grammars=compiler))
        await engine.start()
        busy = [compiler.submit(StructuredOutputsParams(regex=f"{letter}{{2}}")) for letter in "pq"]
        params = SamplingParams(max_tokens=4, structured_outputs={"regex": "[a-z]{3}"})
        queued = asyncio.create_task(engine.compile_grammar(params))
        await asyncio.sleep(0.2)
        compiler.close()  # what engine.shutdown() does first: the queued compile is cancelled
        outcome = await asyncio.gather(queued, return_exceptions=True)
        slow.release.set()
        for future in busy:
            future.result(60)
        await engine.shutdown()
        return outcome

    (outcome,) = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert isinstance(outcome, EngineDeadError), repr(outcome)


async def collect(engine, request_id: str, params: SamplingParams):
    final = None
    async for output in engine.generate(chat_prompt(text_ids(4, 6)), params, request_id):
        final = output
    return final


def test_a_compile_in_its_thread_leaves_the_caller_running(grammars):
    """xgrammar releases the GIL while it compiles: the calling thread keeps getting time."""
    compiler = fresh_compiler(grammars)
    schema = {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer", "array"]} for i in range(160)},
    }
    future = compiler.submit(StructuredOutputsParams(json=schema))
    ticks = 0
    while not future.done():
        time.sleep(0.001)
        ticks += 1
    assert future.result().compile_seconds > 0.02 and ticks > 5
    compiler.close()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are Linux's")
def test_compiles_run_ten_nice_steps_below_the_engine(grammars):
    """A schema that takes seconds to compile must not starve the engine's decode steps of CPU."""
    engine_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def own_nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert grammars._pool.submit(own_nice).result() == min(19, engine_nice + 10)
    assert (
        os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == engine_nice
    )  # the caller keeps its own
