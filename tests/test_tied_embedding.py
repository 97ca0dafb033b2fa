"""A tied embedding table held once: rows read from the vocabulary projection's bf16_rows panels (PanelWeight.rows,
tied_embedding.Embedding), the same embeddings and logits as the plain table, and the plain table back wherever
something needs it (state dict, conversion, loading, unpacking)."""

from __future__ import annotations

import pytest
import torch

from ovis2 import bf16_rows, cpu_linear
from ovis2.bf16_rows import PanelWeight
from ovis2.cpu_linear import Linear
from ovis2.tied_embedding import Embedding

from .linear_bounds import assert_near_reference
from .test_bf16_panels import random_bf16


@pytest.mark.parametrize("shape", [(67, 101), (16, 8), (3, 9), (1, 1)])
def test_panel_rows_are_the_weight_rows(shape):
    weight = random_bf16(*shape, seed=shape[0])
    panels = bf16_rows.panels_of(weight)
    ids = torch.randint(0, shape[0], (5, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(panels.rows(ids), weight[ids])
    every = torch.arange(shape[0])
    assert torch.equal(panels.rows(every), weight)
    assert panels.rows(torch.empty(0, dtype=torch.long)).shape == (0, shape[1])


def test_panel_rows_out_of_range_raise_as_an_embedding_does():
    panels = bf16_rows.panels_of(random_bf16(67, 8, seed=0))  # padded to 80 rows: 67..79 are zeros, not rows
    for bad in (67, 79, 80, -1):
        with pytest.raises(IndexError):
            panels.rows(torch.tensor([0, bad]))


class TiedHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = Embedding(300, 96)
        self.head = Linear(96, 300, bias=False)
        self.head.weight = self.embed.weight


def panels_here(monkeypatch) -> None:
    """Weights laid out as panels whatever the CPU (where the kernel is missing, products take F.linear)."""
    monkeypatch.setattr(cpu_linear, "bf16_rows_serve", lambda: True)


def packed_tied(monkeypatch) -> tuple[TiedHead, torch.Tensor]:
    panels_here(monkeypatch)
    model = TiedHead().to(torch.bfloat16).requires_grad_(False)
    table = model.embed.weight.detach().clone()
    assert model.head.pack(keep_dense=True) and isinstance(model.head.packed_weight, PanelWeight)
    assert model.embed.share_panels(model.head)
    return model, table


def test_the_table_is_freed_and_rows_come_from_the_panels(monkeypatch):
    model, table = packed_tied(monkeypatch)
    assert model.embed.weight.numel() == 0 and model.head.weight.numel() == 0
    ids = torch.tensor([[0, 299, 17], [16, 15, 1]])
    assert torch.equal(model.embed(ids), table[ids])
    hidden = random_bf16(2, 96, seed=3)
    assert_near_reference(model.head(hidden), hidden, table)


def test_the_plain_table_comes_back_wherever_it_is_needed(monkeypatch):
    model, table = packed_tied(monkeypatch)
    state = model.state_dict()
    assert torch.equal(state["embed.weight"], table) and torch.equal(state["head.weight"], table)

    model.head.unpack()
    assert torch.equal(model.embed.weight, table) and model.embed.weight is model.head.weight
    assert torch.equal(model.embed(torch.tensor([5])), table[[5]])

    model, table = packed_tied(monkeypatch)
    model = model.to(torch.float32)
    assert model.head.packed_weight is None and torch.equal(model.embed.weight, table.float())

    model, _ = packed_tied(monkeypatch)
    other = torch.randn(300, 96).to(torch.bfloat16)
    model.load_state_dict({"embed.weight": other, "head.weight": other})
    assert torch.equal(model.embed(torch.tensor([7])), other[[7]])


def test_an_untied_or_oneDNN_packed_projection_leaves_the_table(monkeypatch):
    panels_here(monkeypatch)
    embed, head = Embedding(300, 96).to(torch.bfloat16), Linear(96, 300, bias=False).to(torch.bfloat16)
    assert head.pack() and not embed.share_panels(head)  # not the same parameter
    assert embed.weight.shape == (300, 96)
    packable_f32 = cpu_linear.onednn_packing_available(torch.float32)
    if packable_f32:  # another layout than panels: nothing reads rows from it
        model = TiedHead().requires_grad_(False)
        assert model.head.pack(keep_dense=True) and not model.embed.share_panels(model.head)
        assert model.embed.weight.shape == (300, 96)


def test_the_engine_model_holds_a_tied_table_once(tiny_checkpoints, monkeypatch):
    """The engine's load of a tied checkpoint in bf16 with panels: the embedding table freed, the prompt's
    embeddings equal to the plain table's, the logits within bf16 rounding of the unpacked model's, and the
    saved state dict holding the table."""
    from ovis2.engine.engine_args import EngineArgs
    from ovis2.engine.model_loading import load_model

    panels_here(monkeypatch)
    args = EngineArgs(model=str(tiny_checkpoints["stride1_mha_tied"]), dtype="bfloat16", device="cpu")
    model, reference = load_model(args), load_model(args)
    for module in reference.modules():
        if isinstance(module, Linear):
            module.unpack()
    embed = model.model.language_model.embed_tokens
    assert model.config.tie_word_embeddings and embed.weight.numel() == 0
    table = reference.model.language_model.embed_tokens.weight
    ids = torch.randint(0, 151643, (40,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.embed_multimodal(ids, None), reference.embed_multimodal(ids, None))
    hidden = random_bf16(3, model.config.text_config.hidden_size, seed=4)
    assert_near_reference(model.compute_logits(hidden), hidden, table)
    assert torch.equal(model.state_dict()["model.language_model.embed_tokens.weight"], table)
