"""Prompt logprobs (SamplingParams.prompt_logprobs) against one plain forward pass over the whole prompt."""

from __future__ import annotations

import pytest
import torch

from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.step_costs import StepCosts
from ovis2.errors import Ovis2Error
from ovis2.image_layout import IMAGE_TOKEN_IDS
from tests.engine.conftest import GREEDY, run_to_completion
from tests.engine.prompts import chat_prompt, random_image, text_ids


def reference_prompt_logprobs(model, inputs) -> torch.Tensor:
    """[T, V]: row p is the distribution after prompt token p, image placeholder ids masked as the sampler masks
    them, from the padded (non-paged) forward of the whole prompt."""
    pixels = torch.cat([image.pixel_values for image in inputs.images]) if inputs.images else None
    with torch.inference_mode():
        logits = model(torch.tensor([inputs.prompt_token_ids]), pixel_values=pixels).logits[0].float()
        banned = sorted(t for t in IMAGE_TOKEN_IDS if t < logits.shape[-1])
        logits[:, banned] = float("-inf")
        return logits.log_softmax(dim=-1)


def assert_matches_reference(prompt_logprobs, inputs, reference: torch.Tensor, k: int) -> None:
    ids = inputs.prompt_token_ids
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry, row = prompt_logprobs[p], reference[p - 1]
        if ids[p] in IMAGE_TOKEN_IDS:
            assert entry is None, p
            continue
        # the values' own scale (the masked ids are -inf): fp32 rounding of a paged vs a padded forward
        scale = row[row.isfinite()].abs().max().item()
        assert entry.token_id == ids[p]
        value = row[ids[p]].item()
        assert entry.logprob == pytest.approx(value, rel=1e-4, abs=1e-5 * scale)
        tolerance = 1e-4 * abs(value) + 1e-5 * scale  # a token this close may rank either side of it
        assert (
            int((row > value + tolerance).sum()) + 1 <= entry.rank <= int((row > value - tolerance).sum()) + 1
        )
        values, top_ids = row.topk(k)
        assert [t.token_id for t in entry.top] == top_ids.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), rel=1e-4, abs=1e-5 * scale)


@pytest.mark.parametrize("budget", [None, 7])
def test_prompt_logprobs_equal_a_whole_forward_with_images_and_in_chunks(make_engine, engine_model, budget):
    inputs = chat_prompt(text_ids(5, 20), [random_image(3)])
    chunking = {} if budget is None else {"max_num_batched_tokens": budget}
    engine = make_engine(**chunking)
    params = SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=4, **GREEDY)
    final = run_to_completion(engine, {"p": (inputs, params)})["p"]
    assert_matches_reference(
        final.prompt_logprobs, inputs, reference_prompt_logprobs(engine_model, inputs), 4
    )
    assert any(t in IMAGE_TOKEN_IDS for t in inputs.prompt_token_ids)
    assert len(final.outputs[0].token_ids) == 3


def test_prompt_logprobs_come_with_the_first_tokens_once_for_all_choices(make_engine, engine_model):
    inputs = chat_prompt(text_ids(6, 30))
    engine = make_engine(max_num_batched_tokens=9)
    engine.add_request(
        "n", inputs, SamplingParams(n=3, max_tokens=4, ignore_eos=True, prompt_logprobs=0, **GREEDY)
    )
    outputs = []
    while engine.has_unfinished_requests:
        outputs += engine.step()
    firsts = [o for o in outputs if any(c.token_ids for c in o.outputs)]
    assert all(o.prompt_logprobs is None for o in outputs[: outputs.index(firsts[0])])
    assert all(o.prompt_logprobs is firsts[0].prompt_logprobs for o in firsts)
    assert_matches_reference(
        firsts[0].prompt_logprobs, inputs, reference_prompt_logprobs(engine_model, inputs), 0
    )
    assert all(entry is None or entry.top == [] for entry in firsts[0].prompt_logprobs)
    assert [len(c.token_ids) for c in outputs[-1].outputs] == [4, 4, 4]


def test_a_request_asking_for_prompt_logprobs_computes_a_cached_prompt_again(make_engine, engine_model):
    inputs = chat_prompt(text_ids(7, 40))
    engine = make_engine()
    plain = SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)
    asking = SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2, **GREEDY)
    first = run_to_completion(engine, {"a": (inputs, plain)})["a"]
    again = run_to_completion(engine, {"b": (inputs, asking)})["b"]
    cached = run_to_completion(engine, {"c": (inputs, plain)})["c"]
    assert again.num_cached_tokens == 0 < cached.num_cached_tokens
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == cached.outputs[0].token_ids
    assert_matches_reference(
        again.prompt_logprobs, inputs, reference_prompt_logprobs(engine_model, inputs), 2
    )
    assert first.prompt_logprobs is None and cached.prompt_logprobs is None


def test_prompt_logprobs_survive_preemption_mid_prompt(make_engine, engine_model):
    """A pool too small for three long prompts at once: the newest is preempted while it prefills, recomputes
    its prompt, and does not compute (or repeat) the prompt logprobs it had."""
    block_bytes = make_engine().core.runner.bytes_per_block
    engine = make_engine(kv_cache_memory=12 * block_bytes, max_num_batched_tokens=16)
    assert engine.core.runner.num_blocks == 12
    # tokens alone: at the tiny model's price of a logprob row (~130 tokens) one token a step would be scheduled
    engine.core.scheduler.costs = StepCosts()
    prompts = {f"r{i}": chat_prompt(text_ids(20 + i, 60)) for i in range(3)}
    params = SamplingParams(max_tokens=20, ignore_eos=True, prompt_logprobs=1, **GREEDY)
    preempted_mid_prompt = []
    schedule = engine.core.scheduler.schedule

    def watching():
        out = schedule()
        preempted_mid_prompt.extend(s for s in out.preempted if s.num_output_tokens == 0)
        return out

    engine.core.scheduler.schedule = watching
    final = run_to_completion(engine, {rid: (p, params) for rid, p in prompts.items()})
    assert preempted_mid_prompt
    for rid, inputs in prompts.items():
        reference = reference_prompt_logprobs(engine_model, inputs)
        assert_matches_reference(final[rid].prompt_logprobs, inputs, reference, 1)


def test_prompt_logprobs_is_checked():
    with pytest.raises(Ovis2Error, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(Ovis2Error, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
