"""Dtype names accepted everywhere (EngineArgs, LLM, from_pretrained, --dtype), and what "auto" means."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .errors import Ovis2Error

DtypeName = Literal["auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def check_dtype(dtype) -> str | torch.dtype:
    """A dtype name or one of the three torch floating dtypes; raises Ovis2Error otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise Ovis2Error(
                f"dtype {dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32"
            )
        return dtype
    if dtype is None or dtype in DTYPE_NAMES:
        return dtype
    raise Ovis2Error(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32 (or a torch.dtype)")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """auto (or None): bfloat16 on CUDA, float32 on CPU."""
    dtype = check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]
