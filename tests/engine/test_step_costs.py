"""A step's work within `max_num_batched_tokens`: vision-tower crops and prompt-logprob rows priced in tokens
(step_costs.py), so one request's images or scoring do not hold the other streams for all of their work at once."""

from __future__ import annotations

import torch

from ovis2.configuration import config_for_size
from ovis2.engine.sampling_params import SamplingParams
from ovis2.engine.step_costs import decoder_macs_per_token, step_costs, tower_macs_per_crop
from ovis2.meta_build import build_on_meta
from ovis2.modeling import Ovis2ForConditionalGeneration
from tests.engine.conftest import GREEDY, reference_tokens, run_to_completion
from tests.engine.prompts import chat_prompt, random_image, text_ids


def linear_weights(module: torch.nn.Module) -> int:
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, kinds))


def test_the_prices_count_the_models_own_multiply_adds():
    """The decoder's weights are one token's multiply-adds; a crop's are the patch embedding's and the encoder's
    weights for each patch, the head's for each visual token, and the attention scores'."""
    config = config_for_size("1B")
    model = build_on_meta(lambda: Ovis2ForConditionalGeneration(config))
    layers = model.model.language_model.layers
    assert decoder_macs_per_token(config.text_config) == linear_weights(layers)
    vision, tower = config.vision_config, model.model.vision_tower
    patches = vision.num_patches_per_side**2
    weights = (
        linear_weights(tower.transformer) * patches
        + linear_weights(tower.head_linear) * vision.tokens_per_crop
    )
    scores = 2 * patches * patches * vision.hidden_size * vision.num_hidden_layers
    assert tower_macs_per_crop(vision) == weights + scores
    costs = step_costs(config)
    assert costs.prompt_logprob_row == config.vocab_size * config.hidden_size / linear_weights(layers)


def crops_per_step(engine) -> list[int]:
    """Records the size of each vision-tower batch the engine runs."""
    sizes = []
    visual = engine.core.runner.visual
    original = visual.encode_crops

    def recording(pixels):
        sizes.append(pixels.shape[0])
        return original(pixels)

    visual.encode_crops = recording
    return sizes


def test_an_images_crops_are_spread_over_steps_while_a_stream_keeps_decoding(make_engine, engine_model):
    engine = make_engine(max_num_batched_tokens=4096)
    crop = engine.core.scheduler.costs.crop
    assert crop > 1000  # the tiny model's tower is dear against its decoder: ~3 crops fit a step
    engine.add_request("stream", chat_prompt(text_ids(1, 8)), SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    sizes = crops_per_step(engine)
    big = chat_prompt(text_ids(2, 4), [random_image(3, (3, 3))])  # 10 crops
    engine.add_request("big", big, SamplingParams(max_tokens=3, **GREEDY))
    stream_tokens, final = [], {}
    while "big" not in final:
        outputs = {o.request_id: o for o in engine.step()}
        stream_tokens.append(len(outputs["stream"].outputs[0].token_ids))
        final.update({rid: o for rid, o in outputs.items() if o.finished})
    assert sum(sizes) == 10 and max(sizes) <= 4096 // crop, sizes
    assert stream_tokens == list(range(stream_tokens[0], stream_tokens[0] + len(stream_tokens)))  # one a step
    assert final["big"].outputs[0].token_ids == reference_tokens(engine_model, big, 3)


def test_a_crop_dearer_than_the_whole_budget_still_runs_one_a_step(make_engine, engine_model):
    engine = make_engine(max_num_batched_tokens=512)
    assert engine.core.scheduler.costs.crop > 512
    sizes = crops_per_step(engine)
    inputs = chat_prompt(text_ids(4, 4), [random_image(5, (1, 2)), random_image(6)])  # 3 + 1 crops
    final = run_to_completion(engine, {"a": (inputs, SamplingParams(max_tokens=2, **GREEDY))})
    assert sizes == [1, 1, 1, 1]
    assert final["a"].outputs[0].token_ids == reference_tokens(engine_model, inputs, 2)


def test_the_same_image_twice_in_a_step_runs_the_tower_once(make_engine):
    engine = make_engine(max_num_batched_tokens=16384)  # both requests' three crops in the first step
    sizes = crops_per_step(engine)
    image = random_image(7, (1, 2))
    requests = {
        rid: (chat_prompt(text_ids(seed, 4), [image]), SamplingParams(max_tokens=1, **GREEDY))
        for rid, seed in (("a", 8), ("b", 9))
    }
    run_to_completion(engine, requests)
    assert sizes == [3] and engine.core.runner.visual.num_encoded_images == 1


def test_a_request_reaching_an_image_another_is_still_filling_copies_its_crops(make_engine, engine_model):
    engine = make_engine(max_num_batched_tokens=3000)  # two crops a step
    sizes = crops_per_step(engine)
    image = random_image(11, (3, 3))  # 10 crops
    first = chat_prompt(text_ids(12, 4), [image])
    engine.add_request("a", first, SamplingParams(max_tokens=2, **GREEDY))
    engine.step()
    later = chat_prompt(text_ids(13, 4), [image])
    final = run_to_completion(engine, {"b": (later, SamplingParams(max_tokens=2, **GREEDY))})
    assert sum(sizes) == 10 and engine.core.runner.visual.num_encoded_images == 1, sizes
    assert final["b"].outputs[0].token_ids == reference_tokens(engine_model, later, 2)


def test_decoding_streams_keep_their_token_when_a_crop_passes_the_budget(make_engine):
    """A crop dearer than the budget runs anyway, and ends the step's prefill, not the decodes after it."""
    engine = make_engine(max_num_batched_tokens=512)
    engine.add_request(
        "image", chat_prompt(text_ids(14, 4), [random_image(15, (3, 3))]), SamplingParams(max_tokens=1)
    )
    engine.add_request("stream", chat_prompt(text_ids(16, 4)), SamplingParams(max_tokens=30, ignore_eos=True))
    counts, image_done = [], False
    while not image_done:
        outputs = {o.request_id: o for o in engine.step()}
        counts.append(len(outputs["stream"].outputs[0].token_ids) if "stream" in outputs else None)
        image_done = "image" in outputs and outputs["image"].finished
    assert counts[0] == 1 and len(counts) > 10, (
        counts
    )  # both admitted at once; the image's 10 crops, one a step
    assert counts == list(range(1, len(counts) + 1)), counts


def test_prompt_logprob_rows_are_priced_into_the_chunks(make_engine):
    engine = make_engine(max_num_batched_tokens=2048)
    row = engine.core.scheduler.costs.prompt_logprob_row
    assert row > 50  # the tiny model's vocabulary projection is dear against its decoder
    chunks = []
    schedule = engine.core.scheduler.schedule

    def watching():
        out = schedule()
        chunks.extend(item.num_tokens for item in out.scheduled if item.seq.request.request_id == "scored")
        return out

    engine.core.scheduler.schedule = watching
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, **GREEDY)
    inputs = chat_prompt(text_ids(10, 200))
    final = run_to_completion(engine, {"scored": (inputs, params)})
    assert max(chunks) <= 2048 // (1 + row) and sum(chunks) == len(inputs.prompt_token_ids), chunks
    assert len(final["scored"].prompt_logprobs) == len(inputs.prompt_token_ids)


def test_prefilling_images_take_turns_and_new_requests_still_get_in(make_engine):
    """Two images prefilling at once: the second waits while the first's crop fills the step (it does not pass the
    budget beside it), and a text request arriving meanwhile is admitted with what is left."""
    engine = make_engine(max_num_batched_tokens=2048)  # one crop (~1340) and its tokens a step
    sizes = crops_per_step(engine)
    for rid, seed in (("a", 17), ("b", 18)):
        inputs = chat_prompt(text_ids(seed, 4), [random_image(seed, (3, 3))])  # 10 crops each
        engine.add_request(rid, inputs, SamplingParams(max_tokens=1))
    engine.step()
    engine.add_request("text", chat_prompt(text_ids(19, 6)), SamplingParams(max_tokens=2, ignore_eos=True))
    steps, text_first_token, finished = 0, None, set()
    while engine.has_unfinished_requests:
        steps += 1
        for output in engine.step():
            if output.request_id == "text" and output.outputs[0].token_ids and text_first_token is None:
                text_first_token = steps
            if output.finished:
                finished.add(output.request_id)
    assert sizes == [1] * 20, sizes
    assert text_first_token == 1 and finished == {"a", "b", "text"}
