"""The reference `generate()` samples through the same filters as the engine's sampler."""

from __future__ import annotations

import torch

from ovis2.generation import pick_next_tokens
from tests.engine.prompts import chat_prompt, text_ids


def _generate(model, seed: int | None, **sampling):
    ids = torch.tensor([chat_prompt(text_ids(3, 9)).prompt_token_ids])
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[-1], generator=generator, **sampling)
    return out[0, ids.shape[1] :].tolist()


def test_top_k_one_and_tiny_top_p_sample_the_greedy_tokens(engine_model):
    greedy = _generate(engine_model, None, do_sample=False)
    assert _generate(engine_model, 1, do_sample=True, temperature=5.0, top_k=1) == greedy
    assert _generate(engine_model, 2, do_sample=True, temperature=5.0, top_p=1e-6) == greedy


def test_seeded_sampling_repeats_and_seeds_differ(engine_model):
    first = _generate(engine_model, 7, do_sample=True, temperature=5.0)
    assert _generate(engine_model, 7, do_sample=True, temperature=5.0) == first
    assert _generate(engine_model, 8, do_sample=True, temperature=5.0) != first


def test_top_p_keeps_the_smallest_set_reaching_it():
    logits = torch.tensor([[2.0, 2.0, 0.0, -50.0]]).log_softmax(-1)  # probs ~ [0.47, 0.47, 0.06, 0]
    drawn = {
        int(pick_next_tokens(logits, True, 1.0, 0.9, 0, torch.Generator().manual_seed(s))) for s in range(200)
    }
    assert drawn == {0, 1}
