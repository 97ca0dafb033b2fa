"""Structured outputs through the engine on the tiny random-weight model: the constraint holds whatever the
weights say, and everything around it (seeds, n, stop strings, max_tokens, logprobs, preemption, the prefix cache,
abort) still behaves."""

from __future__ import annotations

import re
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.structured.params import StructuredOutputsParams
from ovis2.errors import Ovis2Error, StructuredOutputError
from ovis2.tokenizer import DEFAULT_EOS_IDS
from tests.engine.conftest import kv_block_bytes, run_to_completion
from tests.engine.prompts import chat_prompt, random_image, text_ids


class Receipt(BaseModel):
    """Every field bounded, so the grammar ends within max_tokens whatever the model samples."""

    merchant: str = Field(max_length=12)
    total_cents: int = Field(ge=0, le=99999)
    currency: Literal["EUR", "USD", "GBP"]
    paid: bool


class Tag(BaseModel):
    """A short answer (about a dozen tokens), for the tests of what goes on around the constraint."""

    label: Literal["cat", "dog", "car"]
    score: int = Field(ge=0, le=9)


RECEIPT = StructuredOutputsParams(json=Receipt.model_json_schema())
TAG = StructuredOutputsParams(json=Tag.model_json_schema())
ENOUGH = 120  # tokens: the longest receipt is well under this


def receipt_params(seed: int, **more) -> SamplingParams:
    return SamplingParams(max_tokens=ENOUGH, seed=seed, structured_outputs=RECEIPT, **more)


def tag_params(seed: int, **more) -> SamplingParams:
    return SamplingParams(max_tokens=ENOUGH, seed=seed, structured_outputs=TAG, **more)


def assert_valid(choice, model: type[BaseModel] = Receipt) -> None:
    # the model's own end: no stop_reason (vLLM's convention: an id only for the request's stop_token_ids)
    assert choice.finish_reason == "stop" and choice.stop_reason is None, choice
    assert choice.token_ids[-1] in DEFAULT_EOS_IDS, choice
    model.model_validate_json(choice.text)


def assert_receipt(choice) -> None:
    assert_valid(choice, Receipt)


def assert_tag(choice) -> None:
    assert_valid(choice, Tag)


def test_json_schema_answers_validate_and_end_on_eos(make_engine, grammars):
    engine = make_engine(grammars=grammars)
    requests = {
        f"s{seed}": (
            chat_prompt(text_ids(seed, 8), [random_image(seed)] if seed % 2 else []),
            receipt_params(seed),
        )
        for seed in range(6)
    }
    final = run_to_completion(engine, requests)
    for output in final.values():
        assert_receipt(output.outputs[0])
    assert len({o.outputs[0].text for o in final.values()}) > 1  # the seeds matter: not one forced answer


def test_a_regex_and_a_choice_hold_for_every_choice(make_engine, grammars):
    engine = make_engine(grammars=grammars)
    choices = ["red", 'say "hi"', "ünïcode\n"]
    requests = {
        "regex": (
            chat_prompt(text_ids(1, 6)),
            SamplingParams(n=3, max_tokens=20, seed=1, structured_outputs={"regex": r"[A-Z]{2}-\d{3}"}),
        ),
        "choice": (
            chat_prompt(text_ids(2, 6)),
            SamplingParams(n=4, max_tokens=20, seed=2, structured_outputs={"choice": choices}),
        ),
    }
    final = run_to_completion(engine, requests)
    for choice in final["regex"].outputs:
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", choice.text) and choice.finish_reason == "stop", choice
    for choice in final["choice"].outputs:
        assert choice.text in choices and choice.finish_reason == "stop", choice


def test_free_requests_get_the_same_tokens_beside_constrained_ones(make_engine, grammars):
    free = {
        f"free{i}": (
            chat_prompt(text_ids(10 + i, 7)),
            SamplingParams(max_tokens=10, seed=i, temperature=0.0 if i == 0 else 1.0, ignore_eos=True),
        )
        for i in range(3)
    }
    constrained = {f"json{i}": (chat_prompt(text_ids(20 + i, 9)), tag_params(i)) for i in range(3)}
    alone = run_to_completion(make_engine(), free)
    mixed = run_to_completion(make_engine(grammars=grammars), {**constrained, **free})
    for request_id in free:
        assert mixed[request_id].outputs[0].token_ids == alone[request_id].outputs[0].token_ids
    for request_id in constrained:
        assert_tag(mixed[request_id].outputs[0])


def test_max_tokens_cuts_an_answer_with_length_and_what_came_is_the_grammars(make_engine, grammars):
    engine = make_engine(grammars=grammars)
    params = SamplingParams(max_tokens=6, seed=3, structured_outputs=RECEIPT)
    out = run_to_completion(engine, {"cut": (chat_prompt(text_ids(3, 8)), params)})["cut"].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    matcher = grammars.compile(RECEIPT).matcher(DEFAULT_EOS_IDS)
    assert all(matcher.accept(token) for token in out.token_ids) and not matcher.is_completed


def test_preempted_choices_resume_with_their_matchers_where_they_were(make_engine, engine_model, grammars):
    prompt = chat_prompt(text_ids(5, 6))
    params = receipt_params(7, n=2)
    roomy = run_to_completion(make_engine(grammars=grammars), {"r": (prompt, params)})["r"]
    memory = 16 * kv_block_bytes(engine_model, block_size=4)
    engine = make_engine(grammars=grammars, kv_cache_memory=memory, enable_prefix_caching=False, block_size=4)
    engine.add_request("r", prompt, params)
    final = None
    while engine.has_unfinished_requests:
        for seq in [s for group in engine.core.groups.values() for s in group.seqs if not s.is_finished]:
            assert seq.matcher.num_accepted_tokens == seq.num_output_tokens  # also while waiting to recompute
        final = next((o for o in engine.step() if o.finished), final)
    assert engine.stats.num_preemptions > 0
    assert [o.token_ids for o in final.outputs] == [o.token_ids for o in roomy.outputs]
    for choice in final.outputs:
        assert_receipt(choice)


def test_a_prefix_cache_hit_gives_the_same_structured_answer(make_engine, grammars):
    engine = make_engine(grammars=grammars)
    prompt = chat_prompt(text_ids(6, 40))
    first = run_to_completion(engine, {"a": (prompt, tag_params(11))})["a"]
    second = run_to_completion(engine, {"b": (prompt, tag_params(11))})["b"]
    assert second.num_cached_tokens > 0 and first.num_cached_tokens == 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_tag(second.outputs[0])


def test_logprobs_and_stop_strings_work_on_a_structured_answer(make_engine, grammars):
    engine = make_engine(grammars=grammars)
    prompt = chat_prompt(text_ids(8, 8))
    final = run_to_completion(
        engine,
        {
            "lp": (prompt, tag_params(5, logprobs=2)),
            "stop": (prompt, tag_params(5, stop=['"score"'])),
        },
    )
    scored = final["lp"].outputs[0]
    assert_tag(scored)
    assert len(scored.logprobs) == len(scored.token_ids) and all(len(lp.top) == 2 for lp in scored.logprobs)
    assert [lp.token_id for lp in scored.logprobs] == scored.token_ids and all(
        lp.logprob <= 0 for lp in scored.logprobs
    )
    stopped = final["stop"].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"score"'
    assert scored.text.startswith(stopped.text) and '"score"' not in stopped.text and stopped.text


def test_aborting_a_structured_request_frees_it_and_others_go_on(make_engine, grammars):
    engine = make_engine(grammars=grammars)
    engine.add_request("gone", chat_prompt(text_ids(1, 8)), tag_params(1))
    engine.add_request("stays", chat_prompt(text_ids(2, 8)), tag_params(2))
    for _ in range(3):
        engine.step()
    assert engine.abort_request("gone").outputs[0].finish_reason == "abort"
    final = {}
    while engine.has_unfinished_requests:
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(final) == ["stays"]
    assert_tag(final["stays"].outputs[0])
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


# A string whose characters must match a class with no members: the opening quote is allowed, then nothing.
DEAD_END = StructuredOutputsParams(json={"type": "string", "pattern": "[^\\s\\S]"})


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 5, "n": 2}])
def test_a_constraint_at_a_dead_end_fails_its_request_alone_as_the_senders_error(
    make_engine, grammars, sampling
):
    engine = make_engine(grammars=grammars)
    dead = SamplingParams(max_tokens=8, structured_outputs=DEAD_END, **sampling)
    final = run_to_completion(
        engine,
        {"dead": (chat_prompt(text_ids(1, 5)), dead), "fine": (chat_prompt(text_ids(2, 5)), tag_params(2))},
    )
    failure = final["dead"]
    assert failure.user_error and all(choice.finish_reason == "error" for choice in failure.outputs)
    assert failure.error.startswith("the JSON schema allows no token after the 1 generated so far"), (
        failure.error
    )
    assert failure.outputs[0].text == '"'
    assert not final["fine"].user_error and final["fine"].error is None
    assert_tag(final["fine"].outputs[0])
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


def test_a_constraint_slower_to_follow_than_the_limit_fails_its_request_alone(make_engine, grammars):
    """Matching runs on the engine's thread: a request whose matching takes longer than the limit for a token, its
    choices together, fails as the sender's error; a request under it in the same batch is untouched."""
    engine = make_engine(grammars=grammars)
    slow = SamplingParams(max_tokens=8, structured_outputs=TAG, n=2, temperature=1.0, seed=3)
    requests = {
        "slow": (chat_prompt(text_ids(1, 5)), slow),
        "fine": (chat_prompt(text_ids(2, 5)), tag_params(2)),
    }
    for request_id, (inputs, params) in requests.items():
        engine.add_request(request_id, inputs, params)
    engine.step()  # both prefilled, first tokens matched under the default limit
    engine.core.args.max_grammar_seconds_per_token = 1e-9  # now any matching is too slow...
    slow_group = engine.core.groups["slow"]
    fine_matcher = engine.core.groups["fine"].seqs[0].matcher
    fine_matcher.take_seconds = lambda: 0.0  # ...but the fine request's, which stays under it
    final = run_to_completion(engine, {})
    failure = final["slow"]
    assert failure.user_error and "too ambiguous" in failure.error, failure.error
    assert all(choice.finish_reason == "error" for choice in failure.outputs)
    assert slow_group.is_finished and final["fine"].error is None
    assert_tag(final["fine"].outputs[0])
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


@pytest.mark.parametrize(
    ("constraint", "reason"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "foo"}}}}, 'Unsupported type "foo"'),
        ({"json": {"type": "array", "uniqueItems": True}}, "#: unique array items"),
        (
            {"json": {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}}},
            "#/properties/n",
        ),
        ({"regex": "(ab"}, "parenthesis is not closed"),
        ({"grammar": "root ::= item"}, 'Rule "item" is not defined'),
        # constraints that compile but that no text satisfies: their first step would allow no token
        ({"grammar": "root ::= root"}, "grammar matches no text"),
        ({"grammar": 'root ::= a\na ::= a "x"'}, "grammar matches no text"),
        ({"regex": "[^\\s\\S]"}, "regex matches no text"),
    ],
)
def test_a_constraint_that_cannot_be_enforced_fails_before_anything_is_queued(
    make_engine, grammars, constraint, reason
):
    engine = make_engine(grammars=grammars)
    params = SamplingParams(max_tokens=8, structured_outputs=constraint)
    with pytest.raises(StructuredOutputError, match=re.escape(reason)) as caught:
        engine.add_request("bad", chat_prompt(text_ids(1, 5)), params)
    assert ".cc:" not in str(caught.value)  # xgrammar's reason without its C++ log prefix
    assert not engine.core.groups and not engine.has_unfinished_requests


@pytest.mark.parametrize("field", [{"ignore_eos": True}, {"min_tokens": 3}])
def test_the_grammar_decides_the_end_so_ignore_eos_and_min_tokens_are_refused(field):
    name = next(iter(field))
    with pytest.raises(Ovis2Error, match=f"'{name}'"):
        SamplingParams(max_tokens=8, structured_outputs=RECEIPT, **field)
