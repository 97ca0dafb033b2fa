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
