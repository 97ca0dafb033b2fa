"""`generate()` for one padded batch, transformers-style: the simple reference path the engine is checked against."""

from __future__ import annotations

import torch

from .layers import PaddedKVCache, default_position_ids
from .logits_processing import apply_top_k, apply_top_p, draw
from .tokenizer import DEFAULT_EOS_IDS, PAD_TOKEN_ID


def new_padded_cache(model, attention_mask: torch.Tensor, max_new_tokens: int) -> PaddedKVCache:
    text = model.config.text_config
    batch, prompt_len = attention_mask.shape
    total = prompt_len + max_new_tokens
    shape = (batch, text.num_key_value_heads, total, text.head_dim)
    layers = range(text.num_hidden_layers)
    key_mask = torch.ones(batch, total, dtype=torch.bool, device=attention_mask.device)
    key_mask[:, :prompt_len] = attention_mask.bool()
    return PaddedKVCache(
        keys=[torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in layers],
        values=[torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in layers],
        key_mask=key_mask,
    )


def pick_next_tokens(logits, do_sample, temperature, top_p, top_k, generator=None) -> torch.Tensor:
    """logits: [B, V] fp32 -> [B] token ids."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    rows = logits.shape[0]
    if top_k and top_k > 0:
        logits = apply_top_k(logits, [top_k] * rows)
    if top_p < 1.0:
        logits = apply_top_p(logits, torch.full((rows,), top_p, dtype=torch.float64, device=logits.device))
    return draw(logits.softmax(-1), [generator] * rows)


@torch.inference_mode()
def generate(
    model,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id=None,
    pad_token_id: int = PAD_TOKEN_ID,
    generator=None,
    **unused,
) -> torch.Tensor:
    """Returns [B, prompt + new] ids; finished rows are padded with `pad_token_id`, as transformers does."""
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device)
    eos = torch.tensor(_as_list(eos_token_id), device=model.device)
    cache = new_padded_cache(model, attention_mask, max_new_tokens)
    positions = default_position_ids(attention_mask)
    step_ids, sequences = input_ids, input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=model.device)
    for _ in range(max_new_tokens):
        logits = model(
            step_ids, pixel_values=pixel_values, position_ids=positions, cache=cache, logits_to_keep=1
        ).logits[:, -1]
        cache.length += step_ids.shape[1]
        pixel_values = None
        next_ids = pick_next_tokens(logits.float(), do_sample, temperature, top_p, top_k, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        finished |= torch.isin(next_ids, eos)
        if finished.all():
            break
        step_ids, positions = next_ids[:, None], positions[:, -1:] + 1
    return sequences


def _as_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return list(DEFAULT_EOS_IDS)
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
