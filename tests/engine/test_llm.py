"""The offline API: LLM(...).chat with PIL images and .generate with token ids."""

import pytest
from PIL import Image

from ovis2.engine.sampling_params import SamplingParams
from ovis2.errors import Ovis2Error, StructuredOutputError
from ovis2.llm import LLM


@pytest.fixture(scope="module")
def llm(engine_checkpoint):
    return LLM(model=str(engine_checkpoint), dtype="float32", device="cpu", kv_cache_memory=4 * 1024 * 1024)


def test_chat_returns_one_result_per_conversation(llm):
    image = Image.new("RGB", (600, 900), (120, 30, 200))
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}],
            }
        ],
        [{"role": "user", "content": "Say hi"}],
    ]
    params = SamplingParams(max_tokens=5, temperature=0.0)
    results = llm.chat(conversations, params)
    assert len(results) == 2
    for result in results:
        completion = result.outputs[0]
        assert completion.finish_reason in ("stop", "length") and 1 <= len(completion.token_ids) <= 5
        assert isinstance(completion.text, str)
    assert results[0].num_image_tokens > 0
    again = llm.chat(conversations[0], params)  # a single conversation works too, and is deterministic
    assert again[0].outputs[0].token_ids == results[0].outputs[0].token_ids


def test_generate_takes_token_ids_and_text(llm):
    results = llm.generate(
        [[151644, 872, 198, 9707], "Hello there"], SamplingParams(max_tokens=3, n=2, seed=1)
    )
    assert len(results) == 2 and all(len(r.outputs) == 2 for r in results)


def test_bad_input_is_a_clear_error_and_nothing_is_left_running(llm):
    with pytest.raises(Ovis2Error):
        llm.generate([list(range(100, 100_000))], SamplingParams(max_tokens=3))
    assert not llm.engine.has_unfinished_requests


def test_structured_outputs_through_sampling_params(llm, grammars):
    llm.engine.input_processor._grammars = (
        grammars  # the session's token tables, instead of building them again
    )
    conversation = [{"role": "user", "content": "Label the picture."}]
    tag = {
        "json": {"type": "object", "properties": {"label": {"enum": ["cat", "dog"]}}, "required": ["label"]}
    }
    results = llm.chat(
        [conversation] * 3,
        [SamplingParams(max_tokens=30, seed=seed, structured_outputs=tag) for seed in range(2)]
        + [SamplingParams(max_tokens=8, seed=1, structured_outputs={"choice": ["left", "right"]})],
    )
    assert all(r.outputs[0].text in ('{"label":"cat"}', '{"label":"dog"}') for r in results[:2]), results
    assert results[2].outputs[0].text in ("left", "right")
    with pytest.raises(StructuredOutputError, match="parenthesis"):
        llm.chat(
            [conversation] * 2,
            [SamplingParams(max_tokens=4), SamplingParams(structured_outputs={"regex": "(x"})],
        )
    assert not llm.engine.has_unfinished_requests  # the good one never started


def test_vllm_prompt_dicts_and_numpy_ids_are_taken(llm):
    import numpy as np

    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    ids = [9707, 11, 1879, 0]
    expected = llm.generate(ids, greedy)[0].outputs[0].token_ids
    for prompt in ({"prompt_token_ids": ids}, [np.int64(t) for t in ids], [{"prompt_token_ids": ids}]):
        assert llm.generate(prompt, greedy)[0].outputs[0].token_ids == expected
    text = llm.generate("Hello there", greedy)[0].outputs[0].token_ids
    assert llm.generate({"prompt": "Hello there"}, greedy)[0].outputs[0].token_ids == text


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm: llm.generate(None), "prompts must be"),
        (lambda llm: llm.generate(5), "prompts must be"),
        (lambda llm: llm.generate({"prompt": "hi", "multi_modal_data": {"image": None}}), "multi_modal_data"),
        (lambda llm: llm.generate({"text": "hi"}), "'prompt' .* or 'prompt_token_ids'"),
        (lambda llm: llm.generate("Hi", {"max_tokens": 3}), "sampling_params must be"),
        (lambda llm: llm.chat("Hi"), "conversations must be"),
        (lambda llm: llm.chat([{"role": "user", "content": 5}]), "content must be a string or a list"),
    ],
)
def test_malformed_offline_inputs_are_clear_errors(llm, call, message):
    with pytest.raises(Ovis2Error, match=message):
        call(llm)
    assert not llm.engine.has_unfinished_requests


def test_two_threads_calling_generate_both_get_their_own_answers(llm):
    """They take turns on the one engine (each stepping it took the other's outputs: one spun for ever)."""
    import threading

    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = {name: [[9707 + k + 10 * i, 11, 1879] for i in range(3)] for k, name in enumerate(("a", "b"))}
    alone = {name: [r.outputs[0].token_ids for r in llm.generate(p, greedy)] for name, p in prompts.items()}
    together: dict[str, list] = {}

    def run(name):
        together[name] = [r.outputs[0].token_ids for r in llm.generate(prompts[name], greedy)]

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone
