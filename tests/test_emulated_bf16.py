"""bf16 models on a CPU without bf16 units (AVX2 only), forced here whatever this CPU has: the vision tower's patch
convolution is computed in fp32 and rounded once, and agrees with the float64 convolution of the same bf16 values."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ovis2 import cpu_linear
from ovis2.configuration import Ovis2VisionConfig
from ovis2.modeling import Ovis2VisionEmbeddings


@pytest.mark.parametrize("emulated", [False, True])
def test_patch_convolution_matches_float64(monkeypatch, emulated):
    monkeypatch.setattr(cpu_linear, "native_bf16_matmul", lambda: not emulated)
    config = Ovis2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56
    )
    torch.manual_seed(0)
    embeddings = Ovis2VisionEmbeddings(config).to(torch.bfloat16)
    pixels = torch.randn(2, 3, 56, 56).to(torch.bfloat16)
    conv = embeddings.patch_embedding
    seen = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, *args: seen.append(x.dtype) or real_conv2d(x, *args))
    with torch.inference_mode():
        out = embeddings._patches(pixels)
    assert seen == [torch.float32 if emulated else torch.bfloat16]
    reference = copy.deepcopy(conv).double()
    monkeypatch.undo()
    with torch.inference_mode():
        expected = reference(pixels.double())
        magnitude = F.conv2d(pixels.double().abs(), reference.weight.abs(), reference.bias.abs(), conv.stride)
    terms = conv.weight[0].numel() + 1
    bound = (
        terms * torch.finfo(torch.float32).eps * magnitude + torch.finfo(torch.bfloat16).eps * expected.abs()
    )
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert ((out.double() - expected).abs() <= bound).all()
