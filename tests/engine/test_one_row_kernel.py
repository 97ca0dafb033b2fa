"""A bf16 model packed as the engine packs it: a one-token forward runs every language-model product through the
compiled one-row kernel (ovis2.packed_gemv), and its logits stay as close to fp32's as oneDNN's own do."""

from __future__ import annotations

import pytest
import torch

from ovis2 import packed_gemv
from ovis2.cpu_linear import Linear, onednn_packing_available
from ovis2.fused_linear import FusedLinears
from ovis2.modeling import Ovis2ForConditionalGeneration

TOKENS = (9, 1234, 151000)


def one_row_owners(model) -> list[Linear | FusedLinears]:
    """The language model's products and the vocabulary projection that run through the kernel."""
    modules = [*model.model.language_model.modules(), model.lm_head]
    owners = [m for m in modules if isinstance(m, Linear) and m.one_row is not None]
    for module in modules:
        for name in ("fused_qkv", "fused_gate_up"):
            group = getattr(module, name, None)
            if group is not None and group.one_row is not None:
                owners.append(group)
    return owners


def last_logits(model, token: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[token]])).logits[0, -1].double()


def test_one_token_forward_takes_the_kernel_within_onednns_noise(engine_checkpoint):
    if not onednn_packing_available(torch.bfloat16) or packed_gemv.kernel_library() is None:
        pytest.skip("the one-row kernel needs oneDNN bf16 packing, AVX512-BF16 and a C compiler")
    reference = Ovis2ForConditionalGeneration.from_pretrained(
        str(engine_checkpoint), dtype="float32", device="cpu"
    )
    model = Ovis2ForConditionalGeneration.from_pretrained(
        str(engine_checkpoint), dtype="bfloat16", device="cpu"
    )
    model.pack_cpu_weights()
    owners = one_row_owners(model)
    layers = model.config.text_config.num_hidden_layers
    assert len(owners) == 4 * layers + 1  # q/k/v, o, gate/up, down per layer; the vocabulary
    calls = []
    for owner in owners:
        kernel = owner.one_row._kernel
        owner.one_row._kernel = lambda *args, kernel=kernel: calls.append(1) or kernel(*args)
    with_kernel = [last_logits(model, token) for token in TOKENS]
    assert len(calls) == len(owners) * len(TOKENS)
    for owner in owners:
        owner.one_row = None
    with_onednn = [last_logits(model, token) for token in TOKENS]
    for token, kernel, onednn in zip(TOKENS, with_kernel, with_onednn, strict=True):
        expected = last_logits(reference, token)
        onednn_error = (onednn - expected).abs().max()
        kernel_error = (kernel - expected).abs().max()
        scale = expected.abs().max()
        assert kernel_error <= 2 * onednn_error + torch.finfo(torch.bfloat16).eps * scale, (
            token,
            kernel_error,
        )
        assert torch.equal(kernel.argmax(), expected.argmax()) or torch.equal(
            onednn.argmax(), kernel.argmax()
        )
