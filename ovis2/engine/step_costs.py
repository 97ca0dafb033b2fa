"""What a step's work costs, counted in prompt tokens, so `max_num_batched_tokens` bounds the time of a step and
with it every running stream's wait between tokens: a prompt token is 1; a crop through the vision tower and a
prompt-logprob row's projection onto the vocabulary are priced by their multiply-adds against one token's pass
through the decoder layers (attention over the context left out: it varies, and is small at these lengths)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configuration import Ovis2Config, Ovis2TextConfig, Ovis2VisionConfig


@dataclass(frozen=True)
class StepCosts:
    crop: float = 0.0  # one 448px crop through the vision tower and the visual head
    prompt_logprob_row: float = 0.0  # one prompt position's logits, beyond its token


def step_costs(config: Ovis2Config) -> StepCosts:
    token = decoder_macs_per_token(config.text_config)
    text = config.text_config
    return StepCosts(
        crop=tower_macs_per_crop(config.vision_config) / token,
        prompt_logprob_row=text.hidden_size * text.vocab_size / token,
    )


def decoder_macs_per_token(text: Ovis2TextConfig) -> int:
    hidden, kv = text.hidden_size, text.num_key_value_heads * text.head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv  # q and o; k and v
    mlp = 3 * hidden * text.intermediate_size  # gate, up, down
    return text.num_hidden_layers * (attention + mlp)


def tower_macs_per_crop(vision: Ovis2VisionConfig) -> int:
    patches = vision.num_patches_per_side**2
    hidden = vision.hidden_size
    embed = patches * vision.num_channels * vision.patch_size**2 * hidden
    layer = (
        patches * (4 * hidden * hidden + 3 * hidden * vision.intermediate_size)
        + 2 * patches * patches * hidden
    )
    words = vision.vocab_size - vision.num_visual_indicator_tokens
    head = vision.tokens_per_crop * hidden * vision.hidden_stride**2 * words
    return embed + vision.num_hidden_layers * layer + head
