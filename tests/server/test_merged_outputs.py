"""merged_outputs: several engine requests answered as one, and closed together."""

import asyncio
from contextlib import aclosing

import pytest

from server.engine_api import CompletionOutput, RequestOutput
from server.merged_outputs import merged_outputs


def fake_stream(
    k: int, steps: int, closed: list, fail_at: int | None = None, error_output_at: int | None = None
):
    async def stream():
        try:
            for step in range(steps):
                await asyncio.sleep(0.001 * (k + 1))
                if step == fail_at:
                    raise RuntimeError(f"stream {k} failed")
                if step == error_output_at:  # the engine's way: an output saying the request failed
                    failed = CompletionOutput(index=0, finish_reason="error")
                    yield RequestOutput(f"r{k}", [k], [failed], error="dead end", user_error=True)
                    await asyncio.sleep(3600)  # a failed request's stream has nothing more
                last = step == steps - 1
                choice = CompletionOutput(
                    index=0,
                    text=f"{k}" * steps if last else "",
                    token_ids=[k] * steps if last else [],
                    delta_text=f"{k}",
                    delta_token_ids=[k],
                    finish_reason="length" if last else None,
                )
                yield RequestOutput(f"r{k}", [k] * (k + 1), [choice], num_cached_tokens=k)
        finally:
            closed.append(k)

    return stream()


async def consume(streams, stop_after=None):
    outputs = []
    merged = merged_outputs(streams, [[0] * (k + 1) for k in range(len(streams))], 1, "req")
    async with aclosing(merged):
        async for output in merged:
            outputs.append(output)
            if stop_after is not None and len(outputs) == stop_after:
                break
    return outputs


def test_every_choice_in_every_output_and_the_last_is_the_whole_answer():
    closed = []
    outputs = asyncio.run(consume([fake_stream(k, 3, closed) for k in range(3)]))
    assert len(outputs) == 9 and all(len(o.outputs) == 3 for o in outputs)
    deltas = ["", "", ""]
    for output in outputs:
        for choice in output.outputs:
            deltas[choice.index] += choice.delta_text
    final = outputs[-1]
    assert deltas == ["000", "111", "222"] == [c.text for c in final.outputs]
    assert final.finished and len(final.prompt_token_ids) == 6 and final.num_cached_tokens == 3
    assert sorted(closed) == [0, 1, 2]


def test_leaving_early_or_one_failure_closes_every_stream():
    closed = []
    outputs = asyncio.run(consume([fake_stream(k, 50, closed) for k in range(3)], stop_after=2))
    assert len(outputs) == 2 and sorted(closed) == [0, 1, 2]
    closed.clear()
    with pytest.raises(RuntimeError, match="stream 1 failed"):
        asyncio.run(consume([fake_stream(k, 50, closed, fail_at=2 if k == 1 else None) for k in range(3)]))
    assert sorted(closed) == [0, 1, 2]


def test_an_output_saying_its_request_failed_ends_the_answer_without_waiting_for_the_others():
    closed = []
    streams = [fake_stream(k, 2000, closed, error_output_at=3 if k == 0 else None) for k in range(2)]
    outputs = asyncio.run(asyncio.wait_for(consume(streams), timeout=30))
    last = outputs[-1]
    assert last.error == "dead end" and last.user_error and last.outputs[0].finish_reason == "error"
    assert not last.outputs[1].finished and sorted(closed) == [0, 1]
