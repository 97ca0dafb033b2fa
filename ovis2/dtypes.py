"""Dtype names accepted everywhere (EngineArgs, LLM, from_pretrained, --dtype), and what "auto" means."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .cpu_linear import packs_weights
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
    """auto (or None): the checkpoints' own bfloat16 on CUDA and on CPUs that compute bf16 natively; float32 on
    other CPUs."""
    dtype = check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        native = device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())
        return torch.bfloat16 if native else torch.float32
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the name --dtype takes."""
    return str(dtype).removeprefix("torch.")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AMX or AVX512-BF16) and the engine packs bf16 weights for oneDNN:
    there bf16 is the faster dtype (a 2-core Xeon with AMX: a 448x448 crop ~0.7-1.6 s against a 4.5 s fp32 floor,
    a batch-16 decode step ~1.8x). Elsewhere bf16 is emulated: oneDNN runs it on plain AVX-512 too, unmeasured
    here, and on AVX2 one crop took 131 s against 8.6 s in fp32."""
    instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return instructions and packs_weights(torch.bfloat16)
