"""Engine fixtures: one tiny fp32 checkpoint and model per session; cheap engines over it."""

from __future__ import annotations

import pytest
import torch

from ovis2.demo import tiny_config
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.llm_engine import LLMEngine
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.structured.compiler import GrammarCompiler
from ovis2.random_checkpoint import write_checkpoint
from ovis2.tokenizer import DEFAULT_EOS_IDS, build_tokenizer
from tests.engine.prompts import chat_prompt, random_image, text_ids


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("engine") / "tiny", tiny_config(), seed=0)


@pytest.fixture(scope="session")
def engine_model(engine_checkpoint):
    from ovis2.modeling import Ovis2ForConditionalGeneration

    return Ovis2ForConditionalGeneration.from_pretrained(
        str(engine_checkpoint), dtype="float32", device="cpu"
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def grammars(tokenizer, engine_model):
    """One structured-output compiler for the session (its token table takes seconds to build); engines share it."""
    compiler = GrammarCompiler(tokenizer, engine_model.config.vocab_size, DEFAULT_EOS_IDS)
    yield compiler
    compiler.close()


@pytest.fixture
def make_engine(engine_checkpoint, engine_model, tokenizer):
    """make_engine(**engine_args) -> LLMEngine on the shared model (each engine has its own KV pool)."""

    def make(grammars=None, **overrides) -> LLMEngine:
        values = dict(
            model=str(engine_checkpoint), dtype="float32", device="cpu", kv_cache_memory=4 * 1024 * 1024
        )
        values.update(overrides)
        return LLMEngine(EngineArgs(**values), model=engine_model, tokenizer=tokenizer, grammars=grammars)

    return make


def run_to_completion(engine: LLMEngine, requests: dict) -> dict:
    """requests: id -> (inputs, params). Adds them all, steps until done; id -> final RequestOutput."""
    for request_id, (inputs, params) in requests.items():
        engine.add_request(request_id, inputs, params)
    final = {}
    while engine.has_unfinished_requests:
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return final


def reference_tokens(model, inputs, max_new_tokens: int) -> list[int]:
    """generate() one request at a time: the new token ids (eos included when it stops there)."""
    pixels = torch.cat([image.pixel_values for image in inputs.images]) if inputs.images else None
    ids = torch.tensor([inputs.prompt_token_ids])
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


GREEDY = dict(temperature=0.0)


def mixed_requests():
    """16 requests: text-only, one image, two images; different prompt and output lengths."""
    images = [random_image(seed, grid) for seed, grid in enumerate([(1, 1), (1, 2), (1, 1), (2, 1)])]
    requests = {}
    for i in range(16):
        kind = i % 4
        pictures = (
            [] if kind == 0 else [images[i % 4]] if kind in (1, 2) else [images[0], images[(i // 4) % 4]]
        )
        prompt = chat_prompt(text_ids(i, 3 + 7 * i), pictures)
        requests[f"r{i}"] = (prompt, SamplingParams(max_tokens=4 + i % 9, **GREEDY))
    return requests


@pytest.fixture(scope="session")
def reference(engine_model):
    return {
        rid: reference_tokens(engine_model, inputs, p.max_tokens)
        for rid, (inputs, p) in mixed_requests().items()
    }


def assert_matches_reference(final, reference):
    for rid, expected in reference.items():
        completion = final[rid].outputs[0]
        assert completion.token_ids == expected, rid
        assert completion.finish_reason == ("stop" if expected[-1] in (151645, 151643) else "length")


def kv_block_bytes(model, block_size: int = EngineArgs.block_size) -> int:
    """Bytes of one KV block, from the model's shapes and dtype: K and V of every layer for block_size tokens."""
    text = model.config.text_config
    return (
        2
        * text.num_hidden_layers
        * block_size
        * text.num_key_value_heads
        * text.head_dim
        * model.dtype.itemsize
    )
