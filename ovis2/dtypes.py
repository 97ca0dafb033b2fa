"""Dtype names accepted everywhere (EngineArgs, LLM, from_pretrained, --dtype), and what "auto" means."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .cpu_linear import bf16_rows_serve, packs_weights
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
    """auto (or None): the checkpoints' own bfloat16 on CUDA and on CPUs where it is the faster dtype
    (`cpu_prefers_bf16`); float32 on other CPUs."""
    dtype = check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        native = device.type == "cuda" or (device.type == "cpu" and cpu_prefers_bf16())
        return torch.bfloat16 if native else torch.float32
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the name --dtype takes."""
    return str(dtype).removeprefix("torch.")


def cpu_prefers_bf16() -> bool:
    """Whether bf16 is the faster dtype on this CPU. With bf16 instructions (AMX or AVX512-BF16) where the engine
    packs bf16 weights for oneDNN (a 2-core Xeon with AMX: a 448x448 crop ~0.7-1.6 s against a 4.5 s fp32 floor,
    a batch-16 decode step ~1.8x). Without them, where oneDNN does not compute bf16 itself and the few-row kernel
    (`bf16_rows`, AVX2) runs: the bf16 weights are read at half fp32's bytes and computed in fp32 (AMD Zen 3, over
    HTTP: output tok/s 1.2-1.3x fp32's on text and the cache-hit chat, level on images, p99 TTFT up to ~1.1x).
    Elsewhere (plain AVX-512: oneDNN emulates bf16, unmeasured; no compiler) float32."""
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return packs_weights(torch.bfloat16)
    return bf16_rows_serve()
