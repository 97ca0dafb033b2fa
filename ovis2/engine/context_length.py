"""How long a sequence may be: the asked max_model_len where the model and the KV pool take it, else the model's
context lowered to the pool; what to change when they do not."""

from __future__ import annotations

import logging

import torch

from ..errors import Ovis2Error

logger = logging.getLogger(__name__)


def kv_budget_setting(device: torch.device) -> str:
    """The setting that sizes the KV pool on this device (flags and LLM keywords alike)."""
    return "kv_cache_memory or gpu_memory_utilization" if device.type == "cuda" else "kv_cache_memory"


def check_pool_blocks(num_blocks: int, block_size: int, device: torch.device) -> None:
    if num_blocks < 2:
        raise Ovis2Error(
            f"the KV cache budget holds {num_blocks} blocks of {block_size} tokens; raise "
            f"{kv_budget_setting(device)} (or lower block_size)"
        )


def max_model_len(asked: int | None, model_max: int, pool_max: int, device: torch.device) -> int:
    """`asked` where the model's context and the pool (`pool_max` tokens: one sequence must always fit alone) take
    it, else an Ovis2Error saying what to change; without one, the model's context, lowered to the pool with a
    warning."""
    if asked is not None and asked > model_max:
        raise Ovis2Error(f"max_model_len {asked} is beyond the model's context ({model_max} tokens)")
    if asked is not None and asked > pool_max:
        raise Ovis2Error(
            f"max_model_len {asked} does not fit the KV cache, which holds {pool_max} tokens: raise "
            f"{kv_budget_setting(device)} or lower max_model_len"
        )
    if asked is None and pool_max < model_max:
        logger.warning(
            "max_model_len is %d, not the model's %d: the KV cache holds no more (raise %s for more)",
            pool_max,
            model_max,
            kv_budget_setting(device),
        )
    return min(asked or model_max, pool_max)
