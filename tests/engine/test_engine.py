"""LLMEngine end to end on a tiny fp32 checkpoint: parity with generate(), preemption, caches, block accounting."""

import pytest
import torch

from ovis2.engine.partial_blocks import SlotCopy
from ovis2.engine.sampling_params import SamplingParams
from ovis2.errors import Ovis2Error
from ovis2.inputs import EngineInputs
from tests.engine.conftest import (
    GREEDY,
    assert_matches_reference,
    kv_block_bytes,
    mixed_requests,
    reference_tokens,
    run_to_completion,
)
from tests.engine.prompts import chat_prompt, random_image, text_ids


def test_concurrent_mixed_requests_match_generate_one_at_a_time(make_engine, reference):
    engine = make_engine()
    final = run_to_completion(engine, mixed_requests())
    assert_matches_reference(final, reference)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_tiny_pool_preempts_and_resumes_with_the_same_tokens(make_engine, reference, engine_model):
    engine = make_engine(kv_cache_memory=80 * kv_block_bytes(engine_model), enable_prefix_caching=False)
    assert engine.core.block_manager.num_total_blocks == 80
    final = run_to_completion(engine, mixed_requests())
    assert engine.stats.num_preemptions > 0
    assert_matches_reference(final, reference)
    assert engine.core.block_manager.num_free_blocks == 80


def test_chunked_prefill_matches_unchunked(make_engine, reference):
    engine = make_engine(max_num_batched_tokens=48)
    final = run_to_completion(engine, mixed_requests())
    assert_matches_reference(final, reference)


def test_second_turn_with_the_same_image_skips_the_vision_tower(make_engine, engine_model):
    image = random_image(42, (1, 2))
    first = chat_prompt(text_ids(1, 20), [image])
    engine = make_engine()
    turn1 = run_to_completion(
        engine, {"t1": (first, SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY))}
    )
    encoded = engine.core.runner.visual.num_encoded_images
    history = first.prompt_token_ids + turn1["t1"].outputs[0].token_ids + [151645, 198, 151644, 872, 198]
    second = type(first)(history + text_ids(2, 9) + [151645, 198, 151644, 77091, 198], [image])
    params = SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY)
    turn2 = run_to_completion(engine, {"t2": (second, params)})["t2"]
    assert (
        engine.core.runner.visual.num_encoded_images == encoded
    )  # zero vision tower runs for the second turn
    assert turn2.num_cached_tokens >= len(first.prompt_token_ids) - 16
    uncached = make_engine(enable_prefix_caching=False, visual_cache_size=0)
    fresh = run_to_completion(uncached, {"t2": (second, params)})["t2"]
    assert turn2.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert fresh.num_cached_tokens == 0 and uncached.core.runner.visual.num_encoded_images == 1


@pytest.mark.parametrize("budget", [None, 6])
def test_the_shared_system_turn_is_copied_not_recomputed_and_answers_alike(make_engine, budget):
    """The template's 14-token system turn and user header end mid-block: they are lent, every other token is
    computed (in chunks of 6 with a small budget)."""
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2, **GREEDY)
    chunking = {} if budget is None else {"max_num_batched_tokens": budget}
    engine = make_engine(**chunking)
    run_to_completion(engine, {"first": (chat_prompt(text_ids(1, 20)), params)})
    second = chat_prompt(text_ids(3, 12))
    reused = run_to_completion(engine, {"second": (second, params)})["second"]
    assert reused.num_cached_tokens == 14
    fresh = run_to_completion(make_engine(enable_prefix_caching=False), {"second": (second, params)})[
        "second"
    ]
    assert fresh.num_cached_tokens == 0
    assert reused.outputs[0].token_ids == fresh.outputs[0].token_ids
    for mine, theirs in zip(reused.outputs[0].logprobs, fresh.outputs[0].logprobs, strict=True):
        assert [t.token_id for t in mine.top] == [t.token_id for t in theirs.top]
        expected = [t.logprob for t in theirs.top]
        scale = max(abs(v) for v in expected)
        assert [t.logprob for t in mine.top] == pytest.approx(expected, rel=1e-4, abs=1e-4 * scale)


def test_a_failed_copy_of_lent_slots_fails_its_borrower_alone(make_engine, monkeypatch):
    params = SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY)
    engine = make_engine()
    run_to_completion(engine, {"first": (chat_prompt(text_ids(1, 20)), params)})

    def broken(copies):
        if copies:
            raise RuntimeError("copy failed")

    monkeypatch.setattr(engine.core.runner, "copy_kv_slots", broken)
    final = run_to_completion(
        engine,
        {"borrower": (chat_prompt(text_ids(2, 9)), params), "other": (EngineInputs(text_ids(3, 9)), params)},
    )
    assert final["borrower"].outputs[0].finish_reason == "error" and "copy failed" in final["borrower"].error
    assert final["other"].error is None and len(final["other"].outputs[0].token_ids) == 3
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_a_cache_salt_separates_tenants_in_the_prefix_and_visual_caches(make_engine):
    image = random_image(7, (1, 1))
    engine = make_engine()
    params = SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)

    def run(name: str, salt: str):
        inputs = chat_prompt(text_ids(4, 6), [image])
        inputs.cache_salt = salt
        return run_to_completion(engine, {name: (inputs, params)})[name]

    run("a1", "a")
    encoded = engine.core.runner.visual.num_encoded_images
    again = run("a2", "a")
    assert engine.core.runner.visual.num_encoded_images == encoded and again.num_cached_tokens > 0
    other = run("b1", "b")
    assert engine.core.runner.visual.num_encoded_images == encoded + 1 and other.num_cached_tokens == 0
    for bad in (5, ""):
        with pytest.raises(Ovis2Error, match="cache_salt"):
            engine.validate(EngineInputs([1, 2, 3], cache_salt=bad), params)


def test_kv_slot_copies_read_every_source_before_writing(make_engine):
    runner = make_engine().core.runner
    for layer, (keys, values) in enumerate(runner.kv_caches):
        for pool, sign in ((keys, 1.0), (values, -1.0)):
            pool[1].fill_(sign * (layer + 1))
            pool[2].fill_(sign * (layer + 1) * 10)
    runner.copy_kv_slots([SlotCopy(1, 2, 3), SlotCopy(2, 1, 2)])
    for layer, (keys, values) in enumerate(runner.kv_caches):
        for pool, sign in ((keys, 1.0), (values, -1.0)):
            one, ten = sign * (layer + 1), sign * (layer + 1) * 10
            assert pool[2, :3].eq(one).all() and pool[2, 3:].eq(ten).all()
            assert pool[1, :2].eq(ten).all() and pool[1, 2:].eq(one).all()


def test_500_mixed_requests_with_aborts_return_every_block(make_engine, engine_model):
    engine = make_engine(kv_cache_memory=200 * kv_block_bytes(engine_model), max_num_seqs=32)
    images = [random_image(100 + k) for k in range(3)]
    for i in range(500):
        pictures = [images[i % 3]] if i % 10 == 0 else []
        params = SamplingParams(
            max_tokens=1 + i % 4, n=1 + (i % 7 == 0), temperature=0.0 if i % 2 else 0.8, seed=i
        )
        engine.add_request(f"m{i}", chat_prompt(text_ids(i, 2 + i % 11), pictures), params)
        if i % 25 == 0:
            engine.step()
        if i % 9 == 0:
            engine.abort_request(f"m{i - 3}")
    while engine.has_unfinished_requests:
        engine.step()
        if engine.core.scheduler.running and engine.stats.num_generated_tokens % 13 == 0:
            engine.abort_request(engine.core.scheduler.running[-1].group.request_id)
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks and all(c == 0 for c in bm.ref_counts)
    assert not engine.core.groups and not engine.core.scheduler.waiting


def test_abort_mid_generation_frees_blocks_and_reports_abort(make_engine):
    engine = make_engine()
    engine.add_request("a", chat_prompt(text_ids(3, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    output = engine.abort_request("a")
    assert output.outputs[0].finish_reason == "abort" and len(output.outputs[0].token_ids) == 3
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_seeded_sampling_is_reproducible_across_runs_and_batches(make_engine):
    target = chat_prompt(text_ids(5, 12), [random_image(5)])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, n=2, ignore_eos=True)
    alone = run_to_completion(make_engine(), {"x": (target, params)})["x"]
    crowd = {
        f"o{i}": (chat_prompt(text_ids(50 + i, 5 + 9 * i)), SamplingParams(max_tokens=5 + i, seed=i))
        for i in range(6)
    }
    crowd["x"] = (target, params)
    batched = run_to_completion(make_engine(max_num_batched_tokens=64), crowd)["x"]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in batched.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # seed + index per choice


def test_n_choices_share_the_prompt_and_greedy_choices_agree(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    prompt = chat_prompt(text_ids(9, 60), [random_image(9)])
    final = run_to_completion(
        engine, {"n": (prompt, SamplingParams(n=3, max_tokens=5, ignore_eos=True, **GREEDY))}
    )
    tokens = [o.token_ids for o in final["n"].outputs]
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 5
    assert engine.stats.num_prompt_tokens < 2 * len(prompt.prompt_token_ids)  # choices 2 and 3 shared it


def test_later_choices_copy_the_first_choices_last_prompt_block_and_answer_alike(make_engine):
    """n=3: the later choices copy the first's KV of the prompt's last, partial block (they compute only their last
    prompt token) and get the tokens and log-probabilities they get computing it themselves."""
    prompt = chat_prompt(text_ids(4, 23))
    length = len(prompt.prompt_token_ids)
    assert length % 16 > 2  # a partial last block with tokens to copy
    params = SamplingParams(n=3, max_tokens=4, ignore_eos=True, logprobs=1, **GREEDY)
    answers, computed = {}, {}
    for lends in (True, False):
        engine = make_engine(enable_prefix_caching=False)
        engine.core.block_manager.lends_partial_blocks = lends
        answers[lends] = run_to_completion(engine, {"n": (prompt, params)})["n"].outputs
        computed[lends] = engine.stats.num_prompt_tokens
    assert computed[True] == length + 2  # each later choice: its last prompt token only
    assert computed[False] == length + 2 * (length % 16)
    for lent, own in zip(answers[True], answers[False], strict=True):
        assert lent.token_ids == own.token_ids
        for a, b in zip(lent.logprobs, own.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-5)


def test_logprobs_stop_strings_and_min_tokens(make_engine, tokenizer):
    engine = make_engine()
    prompt = chat_prompt(text_ids(11, 10))
    probe = run_to_completion(
        engine, {"p": (prompt, SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY))}
    )
    text = probe["p"].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(max_tokens=8, ignore_eos=True, stop=[stop], logprobs=3, **GREEDY)
    out = run_to_completion(engine, {"s": (prompt, params)})["s"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == text[: text.index(stop)]
    assert len(out.logprobs) == len(out.token_ids) and len(out.logprobs[0].top) == 3
    assert out.logprobs[0].top[0].token_id == out.token_ids[0]


def test_stop_token_ids_add_to_eos_and_survive_ignore_eos(make_engine, tokenizer):
    engine = make_engine()
    prompt = chat_prompt(text_ids(12, 9))
    free = run_to_completion(engine, {"f": (prompt, SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY))})
    tokens = free["f"].outputs[0].token_ids
    third = tokens[2]
    for ignore_eos in (False, True):
        params = SamplingParams(max_tokens=6, ignore_eos=ignore_eos, stop_token_ids=[third], **GREEDY)
        out = run_to_completion(engine, {f"s{ignore_eos}": (prompt, params)})[f"s{ignore_eos}"].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == third
        assert out.token_ids == tokens[: tokens.index(third) + 1]
    included = SamplingParams(max_tokens=6, stop_token_ids=[third], include_stop_str_in_output=True, **GREEDY)
    kept = run_to_completion(engine, {"k": (prompt, included)})["k"].outputs[0]
    assert kept.token_ids == out.token_ids and kept.stop_reason == third
    assert kept.text == tokenizer.decode(kept.token_ids, skip_special_tokens=True) != out.text
    assert {151645, 151643} <= SamplingParams(stop_token_ids=[third]).stopping_token_ids
    assert SamplingParams(stop_token_ids=[third], ignore_eos=True).stopping_token_ids == {third}


def test_bad_requests_raise_clear_errors(make_engine):
    engine = make_engine(max_model_len=600, max_images_per_request=1)
    with pytest.raises(Ovis2Error, match="max_model_len"):
        engine.add_request("long", chat_prompt(text_ids(0, 700)), SamplingParams())
    with pytest.raises(Ovis2Error, match="images"):
        engine.add_request("many", chat_prompt([1], [random_image(0), random_image(1)]), SamplingParams())
    broken = chat_prompt([1], [random_image(0)])
    broken.prompt_token_ids.pop(20)  # one image atom fewer than the image gives
    with pytest.raises(Ovis2Error, match="image tokens"):
        engine.add_request("broken", broken, SamplingParams())
    assert not engine.has_unfinished_requests


@pytest.mark.parametrize("error", [RuntimeError("injected"), Ovis2Error("injected")])
def test_a_failing_request_fails_alone(make_engine, error):
    """...as the engine's fault, not the sender's: only a constraint's dead end is the request's own."""
    engine = make_engine()

    def hook(group):
        if group.request_id == "bad":
            raise error

    engine.core.request_hook = hook
    requests = {
        rid: (chat_prompt(text_ids(i, 8), [random_image(i)]), SamplingParams(max_tokens=3, **GREEDY))
        for i, rid in enumerate(["ok1", "bad", "ok2"])
    }
    final = run_to_completion(engine, requests)
    assert final["bad"].error and final["bad"].outputs[0].finish_reason == "error"
    assert not final["bad"].user_error
    for rid in ("ok1", "ok2"):  # both neighbours finish with the answer they get alone
        assert final[rid].error is None
        assert final[rid].outputs[0].token_ids == reference_tokens(engine.core.model, requests[rid][0], 3)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_failing_vision_tower_fails_only_that_request(make_engine, monkeypatch):
    engine = make_engine()
    original = engine.core.runner.visual.encode_crops
    requests = {
        "good": (chat_prompt([5], [random_image(1)]), SamplingParams(max_tokens=2, **GREEDY)),
        "bad": (chat_prompt([5], [random_image(2, (1, 2))]), SamplingParams(max_tokens=2, **GREEDY)),
    }
    bad_crops = requests["bad"][0].images[0].pixel_values

    def flaky(pixels):
        if any(
            torch.equal(crop, bad) for crop in pixels for bad in bad_crops
        ):  # batches holding the bad image
            raise RuntimeError("vision failed")
        return original(pixels)

    monkeypatch.setattr(engine.core.runner.visual, "encode_crops", flaky)
    final = run_to_completion(engine, requests)
    assert "vision failed" in final["bad"].error and final["good"].error is None
    assert final["good"].outputs[0].token_ids == reference_tokens(engine.core.model, requests["good"][0], 2)


def test_a_request_that_breaks_the_batched_forward_fails_alone(make_engine, monkeypatch):
    engine = make_engine()
    original = engine.core.runner._forward
    poison = 4242

    def forward(scheduled, found):
        if any(poison in item.seq.token_ids for item in scheduled):
            raise RuntimeError("forward failed")
        return original(scheduled, found)

    monkeypatch.setattr(engine.core.runner, "_forward", forward)
    requests = {
        rid: (
            chat_prompt(text_ids(i, 6) + ([poison] if rid == "bad" else []), []),
            SamplingParams(max_tokens=4, **GREEDY),
        )
        for i, rid in enumerate(["ok1", "bad", "ok2"])
    }
    final = run_to_completion(engine, requests)
    assert "forward failed" in final["bad"].error and final["bad"].outputs[0].finish_reason == "error"
    for rid in ("ok1", "ok2"):
        assert final[rid].error is None and len(final[rid].outputs[0].token_ids) == 4
        assert final[rid].outputs[0].token_ids == reference_tokens(engine.core.model, requests[rid][0], 4)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_a_request_whose_sampling_fails_fails_alone(make_engine, monkeypatch):
    """A request whose rows break the batch's sampling fails; the others sampled beside it get their answers."""
    from ovis2.engine import execution

    engine = make_engine()
    original = execution.sample

    def sample(logits, rows):
        if any(row.params.seed == 666 for row in rows):
            raise RuntimeError("sampling failed")
        return original(logits, rows)

    monkeypatch.setattr(execution, "sample", sample)
    requests = {
        rid: (
            chat_prompt(text_ids(i, 6)),
            SamplingParams(max_tokens=4, seed=666 if rid == "bad" else None, **GREEDY),
        )
        for i, rid in enumerate(["ok1", "bad", "ok2"])
    }
    final = run_to_completion(engine, requests)
    assert "sampling failed" in final["bad"].error and final["bad"].outputs[0].finish_reason == "error"
    for rid in ("ok1", "ok2"):
        assert final[rid].error is None
        assert final[rid].outputs[0].token_ids == reference_tokens(engine.core.model, requests[rid][0], 4)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_requests_resampled_after_a_failed_batch_draw_as_they_would_have(make_engine, grammars, monkeypatch):
    """A batch that fails after drawing (the seeded generators advanced, constrained logits masked in place): the
    requests sampled again without the failing one get the tokens and log-probabilities of a batch without it."""
    from ovis2.engine import execution

    original = execution.sample

    def sample(logits, rows):
        result = original(logits, rows)
        if any(row.params.seed == 666 for row in rows):
            raise RuntimeError("sampling failed after drawing")
        return result

    def answers(with_bad: bool) -> dict:
        engine = make_engine(grammars=grammars)
        requests = {
            "seeded": (
                chat_prompt(text_ids(1, 7)),
                SamplingParams(max_tokens=4, temperature=1.0, seed=5, logprobs=1),
            ),
            "choice": (
                chat_prompt(text_ids(2, 7)),
                SamplingParams(
                    max_tokens=4, logprobs=1, structured_outputs={"choice": ["yes", "no"]}, **GREEDY
                ),
            ),
        }
        if with_bad:
            requests["bad"] = (
                chat_prompt(text_ids(3, 7)),
                SamplingParams(max_tokens=4, temperature=1.0, seed=666),
            )
        return run_to_completion(engine, requests)

    alone = answers(with_bad=False)
    monkeypatch.setattr(execution, "sample", sample)
    beside = answers(with_bad=True)
    assert "after drawing" in beside["bad"].error
    for rid in ("seeded", "choice"):
        assert beside[rid].error is None
        got, expected = beside[rid].outputs[0], alone[rid].outputs[0]
        assert got.token_ids == expected.token_ids
        assert [t.logprob for t in got.logprobs] == pytest.approx(
            [t.logprob for t in expected.logprobs], rel=1e-5
        )


def test_a_vanishingly_small_top_p_keeps_the_most_likely_token(make_engine):
    """top_p below float32's smallest value (it rounded to 0 and broke the nucleus) samples the greedy token, beside
    a request sampling normally."""
    engine = make_engine()
    prompt = chat_prompt(text_ids(3, 9))
    requests = {
        "tiny": (prompt, SamplingParams(max_tokens=4, temperature=1.0, top_p=1e-300, seed=1)),
        "plain": (chat_prompt(text_ids(4, 9)), SamplingParams(max_tokens=4, temperature=1.0, seed=2)),
    }
    final = run_to_completion(engine, requests)
    assert final["plain"].error is None and len(final["plain"].outputs[0].token_ids) == 4
    assert final["tiny"].error is None
    assert final["tiny"].outputs[0].token_ids == reference_tokens(engine.core.model, prompt, 4)


def test_a_stop_string_before_min_tokens_neither_stops_nor_cuts_the_text(make_engine, tokenizer):
    engine = make_engine()
    prompt = chat_prompt(text_ids(0, 10))
    probe = run_to_completion(
        engine, {"p": (prompt, SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY))}
    )
    tokens = probe["p"].outputs[0].token_ids
    stop = tokenizer.decode(tokens[2:3])  # completed by the third token, before min_tokens are out
    assert stop and stop not in tokenizer.decode(tokens[3:])
    params = SamplingParams(max_tokens=8, min_tokens=6, ignore_eos=True, stop=[stop], **GREEDY)
    out = run_to_completion(engine, {"s": (prompt, params)})["s"].outputs[0]
    assert out.token_ids == tokens and out.finish_reason == "length"
    assert out.text == probe["p"].outputs[0].text == tokenizer.decode(tokens)


def test_sampled_choices_preempted_in_a_tiny_pool_match_a_roomy_pool(make_engine, engine_model):
    prompt = chat_prompt(text_ids(5, 6))
    params = SamplingParams(n=3, max_tokens=40, ignore_eos=True, temperature=1.0, seed=3)
    roomy = run_to_completion(make_engine(), {"r": (prompt, params)})["r"]
    memory = 24 * kv_block_bytes(engine_model, block_size=4)
    engine = make_engine(kv_cache_memory=memory, enable_prefix_caching=False, block_size=4)
    assert engine.core.block_manager.num_total_blocks == 24
    tiny = run_to_completion(engine, {"r": (prompt, params)})["r"]
    assert engine.stats.num_preemptions > 0
    assert [o.token_ids for o in tiny.outputs] == [o.token_ids for o in roomy.outputs]


@pytest.mark.parametrize("kind", ["cumulative", "delta"])
def test_output_kinds_carry_the_same_answer(make_engine, kind):
    engine = make_engine()
    params = SamplingParams(max_tokens=7, ignore_eos=True, logprobs=2, output_kind=kind, **GREEDY)
    engine.add_request("k", chat_prompt(text_ids(9, 12)), params)
    outputs = []
    while engine.has_unfinished_requests:
        outputs += [o.outputs[0] for o in engine.step()]
    final = outputs[-1]
    assert final.finished and len(final.token_ids) == 7 and len(final.logprobs) == 7
    assert [t for o in outputs for t in o.delta_token_ids] == final.token_ids
    assert "".join(o.delta_text for o in outputs) == final.text
    assert [lp for o in outputs for lp in o.delta_logprobs] == final.logprobs
    running = outputs[:-1]
    assert running
    if kind == "delta":  # nothing cumulative before the end: no copies that grow with the output
        assert all(o.token_ids == [] and o.text == "" and o.logprobs == [] for o in running)
    else:
        assert [len(o.token_ids) for o in running] == list(range(1, len(running) + 1))
