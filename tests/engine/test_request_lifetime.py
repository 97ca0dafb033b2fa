"""A request that leaves the engine is freed by reference counting alone: no reference cycle holds its pixels and
token lists until the garbage collector's next full pass (after a burst of image requests that was ~300 MB)."""

from __future__ import annotations

import gc
import weakref

from ovis2.engine.sampling_params import SamplingParams
from tests.engine.prompts import chat_prompt, random_image, text_ids


def test_finished_and_aborted_requests_are_freed_without_the_garbage_collector(make_engine):
    engine = make_engine()
    sampled = SamplingParams(n=2, max_tokens=3, ignore_eos=True, temperature=0.8, seed=1)
    long = SamplingParams(n=2, max_tokens=40, ignore_eos=True, temperature=0.0)
    gc.collect()
    gc.disable()
    try:
        engine.add_request("finishes", chat_prompt(text_ids(1, 12), [random_image(1)]), sampled)
        engine.add_request("aborted", chat_prompt(text_ids(2, 12), [random_image(2)]), long)
        groups = {rid: weakref.ref(group) for rid, group in engine.core.groups.items()}
        pixels = {rid: weakref.ref(g.inputs.images[0].pixel_values) for rid, g in engine.core.groups.items()}
        engine.step()
        engine.abort_request("aborted")
        steps = 0
        while engine.has_unfinished_requests and steps < 50:
            engine.step()
            steps += 1
        assert not engine.has_unfinished_requests
        alive = [rid for rid, ref in {**groups, **pixels}.items() if ref() is not None]
    finally:
        gc.enable()
    assert sorted(groups) == ["aborted", "finishes"] and alive == [], alive
