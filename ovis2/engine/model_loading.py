"""The engine's model at start-up: the checkpoint loaded, its CPU weights packed, its compiled kernels built (CPU's C
kernels, CUDA's Triton kernel)."""

from __future__ import annotations

import torch

from .. import decode_attention, fused_pointwise, native_decode, triton_decode_attention
from ..cpu_linear import bf16_rows_serve
from .engine_args import EngineArgs


def load_model(args: EngineArgs):
    from ..modeling import Ovis2ForConditionalGeneration

    model = Ovis2ForConditionalGeneration.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        compat=args.compat,
        memory_fraction=args.gpu_memory_utilization,
    )
    model.pack_cpu_weights()  # CPU bf16: oneDNN's layout (AMX, AVX512-BF16) or bf16_rows' panels (AVX2 only)
    prepare_cpu_kernels(model)
    prepare_cuda_kernels(model)
    return model


def prepare_cpu_kernels(model) -> None:
    """The bf16 pointwise and decode-attention kernels (on CPUs without bf16 instructions: the bf16 rows product,
    RMSNorm and decode layers kernels) built (about a second each, once per machine) and self-tested at start-up,
    not inside the first request; each decides once whether it runs here."""
    if model.device.type == "cpu" and model.dtype == torch.bfloat16:
        fused_pointwise.rms_silu_library()  # the AVX512-BF16 pointwise kernels, else AVX2's
        decode_attention.kernel_library()
        if bf16_rows_serve():  # builds the bf16 rows kernel where oneDNN emulates bf16
            native_decode.compiled_stack()


def prepare_cuda_kernels(model) -> None:
    """On CUDA, the Triton decode attention kernel compiled and checked against SDPA at start-up (seconds, once),
    not inside the first request's first decode step."""
    if model.device.type == "cuda":
        triton_decode_attention.prepare(next(model.parameters()).device, model.dtype)
