"""AsyncEngine: streaming, cancellation, failure isolation, overload and health."""

import asyncio
import threading
import time

import pytest

from ovis2.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.sampling_params import SamplingParams
from ovis2.errors import Ovis2Error
from tests.engine.prompts import chat_prompt, random_image, text_ids


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


async def collect(engine, request_id, inputs, params):
    return [output async for output in engine.generate(inputs, params, request_id)]


def test_streams_deltas_that_add_up(make_engine):
    async def main():
        engine = AsyncEngine(engine=make_engine())
        await engine.start()
        engine.check_health()
        params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)
        runs = await asyncio.gather(
            *[collect(engine, f"s{i}", chat_prompt(text_ids(i, 10)), params) for i in range(4)]
        )
        await engine.shutdown()
        return runs

    for outputs in run(main()):
        final = outputs[-1].outputs[0]
        assert final.finish_reason == "length" and len(final.token_ids) == 6
        assert sum((o.outputs[0].delta_token_ids for o in outputs), []) == final.token_ids
        assert "".join(o.outputs[0].delta_text for o in outputs) == final.text
        assert outputs[-1].metrics.first_token_time >= outputs[-1].metrics.arrival_time


def test_cancelled_consumer_aborts_and_frees_blocks(make_engine):
    async def main():
        llm = make_engine()
        engine = AsyncEngine(engine=llm)
        await engine.start()
        params = SamplingParams(max_tokens=10_000, ignore_eos=True)

        async def consume():
            async for _ in engine.generate(chat_prompt(text_ids(1, 30), [random_image(1)]), params, "long"):
                pass

        task = asyncio.create_task(consume())
        while llm.stats.num_generated_tokens < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not llm.has_unfinished_requests:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats
        await engine.shutdown()
        return stats

    stats = run(main())
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_one_failing_request_does_not_stop_the_others(make_engine):
    async def main():
        engine = AsyncEngine(engine=make_engine())
        await engine.start()

        def hook(group):
            if group.request_id == "bad":
                raise RuntimeError("injected fault")

        engine.set_request_hook(hook)
        params = SamplingParams(max_tokens=3, temperature=0.0)
        runs = await asyncio.gather(
            *[
                collect(engine, rid, chat_prompt(text_ids(i, 5)), params)
                for i, rid in enumerate(["a", "bad", "b"])
            ]
        )
        engine.check_health()
        await engine.shutdown()
        return runs

    good_a, bad, good_b = run(main())
    assert "injected fault" in bad[-1].error and bad[-1].outputs[0].finish_reason == "error"
    assert good_a[-1].error is None and good_b[-1].outputs[0].finish_reason in ("stop", "length")


def test_user_errors_overload_and_dead_loop(make_engine):
    async def main():
        engine = AsyncEngine(engine=make_engine(max_model_len=100, max_waiting_requests=1))
        await engine.start()
        with pytest.raises(Ovis2Error):
            await collect(engine, "long", chat_prompt(text_ids(0, 200)), SamplingParams())
        engine._num_pending_adds = 5  # as if five requests were still queued
        with pytest.raises(EngineOverloadedError):
            await collect(engine, "x", chat_prompt([1]), SamplingParams())
        engine._num_pending_adds = 0

        def explode():
            raise SystemError("loop bug")

        engine.engine.step = explode
        with pytest.raises(EngineDeadError):
            await collect(engine, "y", chat_prompt([1]), SamplingParams(max_tokens=2))
        with pytest.raises(EngineDeadError):
            engine.check_health()
        await engine.shutdown()

    run(main())


def test_shutdown_ends_the_streams_still_open(make_engine):
    async def main():
        llm = make_engine()
        engine = AsyncEngine(engine=llm)
        await engine.start()
        task = asyncio.create_task(
            collect(
                engine,
                "long",
                chat_prompt(text_ids(2, 10)),
                SamplingParams(max_tokens=10_000, ignore_eos=True),
            )
        )
        while llm.stats.num_generated_tokens < 2:
            await asyncio.sleep(0.01)
        await engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(task, timeout=10)  # hung forever before
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", chat_prompt([1]), SamplingParams(max_tokens=2))

    run(main())


def test_shutdown_ends_the_streams_before_the_step_in_progress_ends(make_engine):
    step_seconds = 3.0
    in_step = threading.Event()

    def slow_step(group):
        if group.request_id == "slow":
            in_step.set()
            time.sleep(step_seconds)

    async def main():
        engine = AsyncEngine(engine=make_engine())
        await engine.start()
        engine.set_request_hook(slow_step)
        params = SamplingParams(max_tokens=10_000, ignore_eos=True)
        tasks = [
            asyncio.create_task(collect(engine, rid, chat_prompt(text_ids(i, 10)), params))
            for i, rid in enumerate(("slow", "other"))
        ]
        while not in_step.is_set():
            await asyncio.sleep(0.01)
        started = time.monotonic()
        shutdown = asyncio.create_task(engine.shutdown())
        await asyncio.sleep(0)  # shutdown has begun; a request arriving now is refused at once, not queued
        late = collect(engine, "late", chat_prompt(text_ids(3, 10)), params)
        results = await asyncio.gather(*tasks, late, return_exceptions=True)
        heard = time.monotonic() - started
        await shutdown
        return results, heard

    results, heard = run(main())
    assert len(results) == 3 and all(isinstance(result, EngineDeadError) for result in results), results
    assert heard < step_seconds / 2, heard


def test_a_slow_consumer_gets_one_merged_output_not_one_per_step(make_engine):
    async def main():
        llm = make_engine()
        engine = AsyncEngine(engine=llm)
        await engine.start()
        params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0, logprobs=1)
        stream = engine.generate(chat_prompt(text_ids(3, 10)), params, "slow")
        outputs = [await anext(stream)]
        while llm.has_unfinished_requests:  # the consumer stalls while the engine finishes the request
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        outputs += [output async for output in stream]
        await engine.shutdown()
        return outputs

    outputs = run(main())
    final = outputs[-1].outputs[0]
    assert (
        len(outputs) <= 3
    )  # queued outputs were merged (each holds everything so far: one per step grows O(n^2))
    assert final.finish_reason == "length" and len(final.token_ids) == 40
    assert sum((o.outputs[0].delta_token_ids for o in outputs), []) == final.token_ids
    assert "".join(o.outputs[0].delta_text for o in outputs) == final.text
    assert sum((o.outputs[0].delta_logprobs for o in outputs), []) == final.logprobs


class RecordingEngine:
    """Stands in for LLMEngine: records the thread that built it and the threads that step it."""

    threads: list[str] = []

    def __init__(self, args, processor=None) -> None:
        RecordingEngine.threads.append(("built", threading.current_thread().name))
        self.input_processor = self

    @property
    def has_unfinished_requests(self) -> bool:
        RecordingEngine.threads.append(("stepped", threading.current_thread().name))
        return False

    def close(self) -> None:
        pass


def test_the_model_is_built_and_stepped_on_one_thread(monkeypatch):
    """One thread owns the model's compute: libgomp gives each calling thread its own OpenMP team, and two
    teams on few cores slow every op (async_engine.AsyncEngine.start)."""
    from ovis2.engine import async_engine

    monkeypatch.setattr(async_engine, "LLMEngine", RecordingEngine)
    RecordingEngine.threads = []

    async def run():
        engine = AsyncEngine(EngineArgs(model="demo"))
        await engine.start()
        await asyncio.sleep(0.05)
        await engine.shutdown()

    asyncio.run(run())
    kinds = {kind for kind, _ in RecordingEngine.threads}
    names = {name for _, name in RecordingEngine.threads}
    assert kinds == {"built", "stepped"} and names == {"ovis2-engine"}


def test_a_model_that_cannot_load_fails_start(monkeypatch):
    from ovis2.engine import async_engine

    def broken(args, processor=None):
        raise Ovis2Error("no such checkpoint")

    monkeypatch.setattr(async_engine, "LLMEngine", broken)

    async def run():
        engine = AsyncEngine(EngineArgs(model="demo"))
        with pytest.raises(Ovis2Error, match="no such checkpoint"):
            await engine.start()
        with pytest.raises(EngineDeadError):
            engine.check_health()

    asyncio.run(run())


def test_idle_hook_runs_once_per_busy_spell_and_a_failing_one_harms_nothing(make_engine):
    calls = []

    def hook():
        calls.append(threading.current_thread().name)
        raise RuntimeError("the hook's own failure")

    async def main():
        engine = AsyncEngine(engine=make_engine())
        await engine.start()
        engine.set_idle_hook(hook)
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
        done = []
        for spell in range(2):
            await asyncio.gather(
                *[collect(engine, f"i{spell}{i}", chat_prompt(text_ids(i, 8)), params) for i in range(3)]
            )
            for _ in range(200):
                if len(calls) > spell:
                    break
                await asyncio.sleep(0.01)
            done.append(len(calls))
        await asyncio.sleep(0.1)  # idle: no further calls
        engine.check_health()
        await engine.shutdown()
        return done

    assert run(main()) == [1, 2] and calls == ["ovis2-engine", "ovis2-engine"]


async def started_with_timed_hook(make_engine, calls: list, quiet: float) -> AsyncEngine:
    """A started engine whose idle hook appends the time it ran to `calls`."""
    engine = AsyncEngine(engine=make_engine())
    await engine.start()
    engine.set_idle_hook(lambda: calls.append(time.monotonic()), quiet_seconds=quiet)
    return engine


def test_idle_hook_runs_when_asked_for_without_a_step(make_engine):
    quiet = 0.2
    calls = []

    async def main():
        engine = await started_with_timed_hook(make_engine, calls, quiet)
        await asyncio.sleep(quiet * 2)
        never_asked = len(calls)
        asked = time.monotonic()
        engine.request_idle_hook()
        while not calls and time.monotonic() - asked < quiet + 5:
            await asyncio.sleep(0.01)
        await asyncio.sleep(quiet * 2)  # once per request
        await engine.shutdown()
        return never_asked, asked

    never_asked, asked = run(main())
    assert never_asked == 0 and len(calls) == 1, calls
    assert calls[0] - asked >= quiet * 0.5, (calls[0] - asked, quiet)


def test_asking_for_the_idle_hook_again_and_again_does_not_put_it_off(make_engine):
    quiet = 0.3
    calls = []

    async def main():
        engine = await started_with_timed_hook(make_engine, calls, quiet)
        first_ask = time.monotonic()
        while time.monotonic() - first_ask < quiet * 6:  # a steady trickle of finished responses
            engine.request_idle_hook()
            await asyncio.sleep(quiet / 2)
        await engine.shutdown()
        engine.request_idle_hook()  # stopped: nothing to do, nothing queued
        return first_ask

    first_ask = run(main())
    assert len(calls) >= 2, calls
    assert calls[0] - first_ask < quiet * 3, (calls[0] - first_ask, quiet)


def test_idle_hook_waits_for_its_quiet_time_and_work_within_it_postpones_it(make_engine):
    quiet = 0.4
    calls = []

    async def main():
        engine = await started_with_timed_hook(make_engine, calls, quiet)
        params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
        await collect(engine, "first", chat_prompt(text_ids(1, 8)), params)
        await asyncio.sleep(quiet / 4)
        calls_between = len(calls)
        await collect(engine, "second", chat_prompt(text_ids(2, 8)), params)
        second_done = time.monotonic()
        while not calls and time.monotonic() - second_done < quiet + 5:
            await asyncio.sleep(0.01)
        await asyncio.sleep(quiet)  # no second call for the same spell
        await engine.shutdown()
        return calls_between, second_done

    calls_between, second_done = run(main())
    assert calls_between == 0 and len(calls) == 1, calls
    assert calls[0] - second_done >= quiet * 0.5, (calls[0] - second_done, quiet)
