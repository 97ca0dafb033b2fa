"""The engine's three parts and the settings they share: what a new user hit before they were one."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ovis2 import LLM, Ovis2Processor, bf16_rows, decode_attention, fused_pointwise
from ovis2.checkpoint import resolve_checkpoint
from ovis2.cpu_linear import native_bf16_matmul
from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.token_bytes import TokenBytes
from ovis2.errors import Ovis2Error
from ovis2.image_layout import crop_count
from ovis2.random_checkpoint import demo_checkpoint_dir
from ovis2.tokenizer import build_tokenizer
from tests.engine.conftest import run_to_completion
from tests.engine.prompts import chat_prompt, text_ids
from tests.test_import_graph import import_graph

KV = 4 * 1024 * 1024


def big_image_chat(**part) -> list[dict]:
    image = Image.new("RGB", (3000, 3000), (90, 160, 30))
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image, **part}, {"type": "text", "text": "?"}],
        }
    ]


def test_llm_applies_max_tiles_per_image(engine_checkpoint):
    capped = LLM(model=str(engine_checkpoint), device="cpu", kv_cache_memory=KV, max_tiles_per_image=4)
    inputs = capped.engine.input_processor.chat_inputs(big_image_chat())
    assert inputs.images[0].num_crops == crop_count(inputs.images[0].grid) and inputs.images[0].num_crops <= 5
    default = LLM(model=str(engine_checkpoint), device="cpu", kv_cache_memory=KV)
    assert default.engine.input_processor.chat_inputs(big_image_chat()).images[0].num_crops > 5  # 9 tiles + 1
    with pytest.raises(Ovis2Error, match="1 to 4 tiles"):
        capped.engine.input_processor.chat_inputs(big_image_chat(), max_patches=9)
    with pytest.raises(Ovis2Error, match="1 to 4 tiles"):
        capped.engine.input_processor.chat_inputs(big_image_chat(max_patches=6))


def test_dtype_may_be_a_torch_dtype_or_any_name_from_pretrained_takes(engine_checkpoint):
    llm = LLM(model=str(engine_checkpoint), dtype=torch.float32, device="cpu", kv_cache_memory=KV)
    assert llm.engine.core.model.dtype == torch.float32 and llm.engine.dtype_name == "float32"
    bf16 = LLM(model=str(engine_checkpoint), dtype="bf16", device="cpu", kv_cache_memory=KV)
    assert bf16.engine.dtype_name == "bfloat16"  # what the server's start-up line reports
    assert EngineArgs(dtype="half").dtype == "half"
    with pytest.raises(Ovis2Error, match="dtype"):
        EngineArgs(dtype=torch.int8)


def test_demo_resolves_to_one_folder_for_the_model_and_the_processor(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_checkpoint("demo")
    assert folder == demo_checkpoint_dir() and (folder / "model.safetensors").is_file()
    processor = Ovis2Processor.from_pretrained("demo")  # went to the hub before
    assert processor.tokenizer.convert_tokens_to_ids("<IMG_ATOM>") == 151665


def test_the_core_knows_no_tokenizer_and_no_text():
    graph = import_graph()
    seen, todo = set(), ["ovis2.engine.core"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    text_side = {
        "ovis2.engine.detokenizer",
        "ovis2.engine.output_processor",
        "ovis2.engine.input_processor",
        "ovis2.processing",
        "ovis2.engine.llm_engine",
    }
    assert not seen & text_side


def test_a_stop_string_ends_the_choice_in_the_core(make_engine):
    engine = make_engine()
    free = engine.core.block_manager.num_free_blocks
    probe = run_to_completion(
        engine,
        {
            "p": (
                chat_prompt(text_ids(3, 12)),
                SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            )
        },
    )["p"]
    stop = probe.outputs[0].text[3:6]
    assert stop, "the probe must generate some text"
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    engine.add_request("s", chat_prompt(text_ids(3, 12)), params)
    finished = None
    while finished is None:
        finished = next((o for o in engine.step() if o.finished), None)
    assert finished.outputs[0].finish_reason == "stop" and finished.outputs[0].stop_reason == stop
    assert "s" not in engine.core.groups and not engine.core.scheduler.running  # no step more for it
    assert engine.core.block_manager.num_free_blocks == free


def test_token_bytes_are_the_tokens_own_bytes():
    token_bytes = TokenBytes(build_tokenizer().backend_tokenizer)
    assert token_bytes(123057) == [0xE4, 0x90]  # the first two bytes of a three-byte character
    assert bytes(token_bytes(9707)) == b"Hello" and bytes(token_bytes(151645)) == b"<|im_end|>"


def test_logprobs_carry_token_bytes(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    out = run_to_completion(engine, {"l": (chat_prompt(text_ids(5, 8)), params)})["l"].outputs[0]
    token_bytes = TokenBytes(engine.tokenizer.backend_tokenizer)
    assert [lp.bytes for lp in out.logprobs] == [token_bytes(t) for t in out.token_ids]
    assert all(top.bytes == token_bytes(top.token_id) for lp in out.logprobs for top in lp.top)


def test_an_extreme_temperature_offline_samples_without_hurting_its_neighbours(make_engine):
    """The HTTP API stops at 2 (OpenAI's range); SamplingParams still takes more, and the engine survives it."""
    engine = make_engine()
    hot = SamplingParams(max_tokens=4, temperature=1e308, seed=1, ignore_eos=True)
    calm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    alone = run_to_completion(make_engine(), {"calm": (chat_prompt(text_ids(9, 6)), calm)})["calm"]
    final = run_to_completion(
        engine, {"hot": (chat_prompt(text_ids(8, 6)), hot), "calm": (chat_prompt(text_ids(9, 6)), calm)}
    )
    assert len(final["hot"].outputs[0].token_ids) == 4 and final["hot"].error is None
    assert final["calm"].outputs[0].token_ids == alone.outputs[0].token_ids


def test_a_request_whose_text_cannot_be_built_fails_alone(make_engine, monkeypatch):
    from ovis2.engine.detokenizer import IncrementalDetokenizer

    original = IncrementalDetokenizer.add_token

    def add_token(self, token_id, check_stops=True):
        if "boom" in self.stops:
            raise ValueError("detokenizer failed")
        return original(self, token_id, check_stops)

    monkeypatch.setattr(IncrementalDetokenizer, "add_token", add_token)
    engine = make_engine()
    greedy = dict(max_tokens=4, temperature=0.0, ignore_eos=True)
    final = run_to_completion(
        engine,
        {
            "bad": (chat_prompt(text_ids(1, 6)), SamplingParams(stop=["boom"], **greedy)),
            "good": (chat_prompt(text_ids(2, 6)), SamplingParams(**greedy)),
        },
    )
    assert final["bad"].outputs[0].finish_reason == "error" and "detokenizer failed" in final["bad"].error
    assert final["good"].error is None and len(final["good"].outputs[0].token_ids) == 4
    assert (
        not engine.core.groups
        and engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks
    )


def test_a_request_whose_token_cannot_be_taken_fails_alone(make_engine, monkeypatch):
    """In the core (a stop check raising for one request, as a scalar stop_token_ids once did): its neighbours in
    the step go on."""
    from ovis2.engine.core import EngineCore

    original = EngineCore._stop_reason

    def stop_reason(self, seq, token_id):
        if seq.group.request_id == "bad":
            raise TypeError("'int' object is not iterable")
        return original(self, seq, token_id)

    monkeypatch.setattr(EngineCore, "_stop_reason", stop_reason)
    engine = make_engine()
    greedy = dict(max_tokens=4, temperature=0.0, ignore_eos=True)
    final = run_to_completion(
        engine,
        {
            name: (chat_prompt(text_ids(k, 6)), SamplingParams(**greedy))
            for k, name in enumerate(("bad", "a", "b"))
        },
    )
    assert final["bad"].outputs[0].finish_reason == "error" and "not iterable" in final["bad"].error
    assert all(
        final[name].error is None and len(final[name].outputs[0].token_ids) == 4 for name in ("a", "b")
    )
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_total_blocks


@pytest.mark.parametrize(
    "values, name",
    [
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(top_k=0.5), "top_k"),
        (dict(logprobs=True), "logprobs"),
        (dict(logit_bias={"9707": 5.0}), "logit_bias"),
        (dict(n=2.5), "n"),
        (dict(seed=1.5), "seed"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=None), "temperature"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_sampling_params_of_the_wrong_type_are_refused_when_built(values, name):
    """They passed the range checks and failed inside the engine (a scalar stop_token_ids failed every request of
    its step); the server's request models type them, offline callers had no such check."""
    with pytest.raises(Ovis2Error, match=f"invalid sampling parameter '{name}'"):
        SamplingParams(**values)
    params = SamplingParams()
    params.stop = "ab"  # set after construction: not split into single characters
    with pytest.raises(Ovis2Error, match="'stop'"):
        params.validate()
    assert SamplingParams(stop=None, logit_bias=None).stop == []  # vLLM's None for "none"


def test_an_aborted_request_reports_its_cached_prompt_tokens(make_engine):
    engine = make_engine(max_num_batched_tokens=32)
    shared = text_ids(4, 64)
    run_to_completion(engine, {"warm": (chat_prompt(shared), SamplingParams(max_tokens=1, temperature=0.0))})
    engine.add_request(
        "long", chat_prompt(shared + text_ids(5, 200)), SamplingParams(max_tokens=2, temperature=0.0)
    )
    engine.step()  # admitted with its cached prefix, one chunk of the rest prefilled
    aborted = engine.abort_request("long")
    assert aborted.outputs[0].finish_reason == "abort" and aborted.num_cached_tokens >= 48


def test_a_bf16_cpu_engine_decides_its_kernels_at_start_up(engine_checkpoint):
    """Built (or found unavailable) while the engine loads, so no request waits for a compiler."""
    kernels = [fused_pointwise.kernel_library, decode_attention.kernel_library]
    if not native_bf16_matmul():
        kernels.append(bf16_rows.kernel_library)
    if fused_pointwise.kernel_library() is None:
        kernels.append(fused_pointwise.avx2_library)
    for kernel in kernels:
        kernel.cache_clear()
    LLM(model=str(engine_checkpoint), dtype="bf16", device="cpu", kv_cache_memory=KV)
    assert all(kernel.cache_info().currsize == 1 for kernel in kernels)


def test_max_model_len_is_what_was_asked_or_a_clear_error(make_engine, engine_model, caplog):
    """An asked max_model_len beyond the model's context or the KV pool is refused, naming what to change; without
    one, the model's context is lowered to the pool with a warning (it was lowered silently)."""
    from tests.engine.conftest import kv_block_bytes

    model_max = engine_model.config.text_config.max_position_embeddings
    with pytest.raises(Ovis2Error, match=f"beyond the model's context \\({model_max} tokens\\)"):
        make_engine(max_model_len=model_max + 1)
    memory = 8 * kv_block_bytes(engine_model)  # 8 blocks of 16 tokens
    with pytest.raises(
        Ovis2Error, match="does not fit the KV cache, which holds 128 tokens: raise kv_cache_memory"
    ):
        make_engine(kv_cache_memory=memory, max_model_len=129)
    assert make_engine(kv_cache_memory=memory, max_model_len=128).max_model_len == 128
    with caplog.at_level("WARNING", logger="ovis2.engine.context_length"):
        assert make_engine(kv_cache_memory=memory).max_model_len == 128
    assert f"max_model_len is 128, not the model's {model_max}" in caplog.text


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(max_num_seqs="8"), "max_num_seqs must be int, not str"),
        (dict(max_num_seqs=2.5), "max_num_seqs must be int, not float"),
        (dict(enable_prefix_caching="no"), "enable_prefix_caching must be bool"),
        (dict(max_model_len=True), "max_model_len must be int or NoneType, not bool"),
        (dict(max_video_frames_per_request=4), "every video request naming no frame count would be refused"),
    ],
)
def test_engine_args_of_the_wrong_type_or_at_odds_are_refused(values, message):
    """LLM(...)'s keywords: a string count failed with a TypeError, a fractional one was taken; a per-request
    frame cap below a video's default frame count refused every video request naming none."""
    with pytest.raises(Ovis2Error, match=message):
        EngineArgs(**values)
    assert (
        EngineArgs(
            gpu_memory_utilization=1, max_video_frames=4, max_video_frames_per_request=4
        ).max_video_frames
        == 4
    )


def test_engine_args_take_a_path_like_model_and_other_kinds_of_numbers():
    """As before the type checks: a path, a torch.device, numpy numbers, 0 or 1 for a flag (made Python's)."""
    from pathlib import Path

    import numpy as np

    args = EngineArgs(
        model=Path("/models/ovis2"),
        device=torch.device("cpu"),
        max_num_seqs=np.int64(4),
        gpu_memory_utilization=np.float32(0.5),
        enable_prefix_caching=0,
        enforce_eager=np.bool_(True),
    )
    assert (args.model, args.device, args.max_num_seqs, args.enable_prefix_caching, args.enforce_eager) == (
        "/models/ovis2",
        "cpu",
        4,
        False,
        True,
    )
    assert type(args.max_num_seqs) is int and type(args.gpu_memory_utilization) is float
    params = SamplingParams(
        stop=("###",), stop_token_ids={5}, ignore_eos=np.bool_(True), skip_special_tokens=0
    )
    assert (params.stop, params.stop_token_ids, params.ignore_eos, params.skip_special_tokens) == (
        ["###"],
        [5],
        True,
        False,
    )
