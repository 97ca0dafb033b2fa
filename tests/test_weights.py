"""Checkpoint loading: both formats, shards, dtypes, and clear failures."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovis2.errors import Ovis2Error
from ovis2.modeling import Ovis2ForConditionalGeneration
from tests.checkpoints import prompt_ids, random_pixels, write_original_layout

IDS = prompt_ids([[151644, 872, 198], [3838, 374, 151645]], [(1, 2)], 256)


def logits(model, pixels):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([IDS]), pixel_values=pixels, logits_to_keep=8).logits


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Ovis2ForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype="float32")


@pytest.mark.parametrize("shape", ["stride2_gqa_untied", "stride2_gqa_tied"])
def test_original_layout_gives_same_logits(tiny_checkpoints, tmp_path, shape):
    hf_dir = tiny_checkpoints[shape]
    original = Ovis2ForConditionalGeneration.from_pretrained(
        str(write_original_layout(hf_dir, tmp_path / "orig"))
    )
    hf = Ovis2ForConditionalGeneration.from_pretrained(str(hf_dir))
    assert original.config.source_format == "ovis"
    pixels = random_pixels([(1, 2)], seed=5)
    assert torch.equal(logits(original, pixels), logits(hf, pixels))


def test_tied_only_without_lm_head(tiny_checkpoints):
    tied = Ovis2ForConditionalGeneration.from_pretrained(str(tiny_checkpoints["stride2_gqa_tied"]))
    untied = Ovis2ForConditionalGeneration.from_pretrained(str(tiny_checkpoints["stride2_gqa_untied"]))
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.language_model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.language_model.embed_tokens.weight)


def test_sharded_checkpoint_and_save_roundtrip(reference, tiny_checkpoint, tmp_path):
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(sharded / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_checkpoint / "config.json", sharded / "config.json")
    loaded = Ovis2ForConditionalGeneration.from_pretrained(str(sharded))
    pixels = random_pixels([(1, 2)], seed=6)
    assert torch.equal(logits(loaded, pixels), logits(reference, pixels))
    loaded.save_pretrained(tmp_path / "saved")
    again = Ovis2ForConditionalGeneration.from_pretrained(str(tmp_path / "saved"))
    assert torch.equal(logits(again, pixels), logits(reference, pixels))


def test_loads_directly_in_bfloat16(tiny_checkpoint):
    model = Ovis2ForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model.generate(torch.tensor([IDS]), pixel_values=random_pixels([(1, 2)], seed=7), max_new_tokens=3)
    assert out.shape == (1, len(IDS) + 3)


def test_bad_path_names_it():
    with pytest.raises(Ovis2Error, match="/no/such/checkpoint"):
        Ovis2ForConditionalGeneration.from_pretrained("/no/such/checkpoint")


def test_corrupt_safetensors_names_the_file(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(Ovis2Error, match="model.safetensors"):
        Ovis2ForConditionalGeneration.from_pretrained(str(broken))


def test_missing_config_field_is_named(tiny_checkpoint, tmp_path):
    broken = tmp_path / "nofield"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["text_config"]["num_attention_heads"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(Ovis2Error, match="text_config.num_attention_heads"):
        Ovis2ForConditionalGeneration.from_pretrained(str(broken))


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_checkpoint, tmp_path):
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    cases = {
        "lacks tensors: model.language_model.norm.weight": lambda s: s.pop(
            "model.language_model.norm.weight"
        ),
        "unexpected tensors: extra.weight": lambda s: s.update({"extra.weight": torch.zeros(1)}),
        "wrong shape: model.visual_embeddings_table.weight": lambda s: s.update(
            {"model.visual_embeddings_table.weight": torch.zeros(3, 3)}
        ),
    }
    for index, (message, edit) in enumerate(cases.items()):
        directory = tmp_path / f"case{index}"
        directory.mkdir()
        edited = dict(state)
        edit(edited)
        save_file(edited, str(directory / "model.safetensors"))
        shutil.copy(tiny_checkpoint / "config.json", directory / "config.json")
        with pytest.raises(Ovis2Error, match=message):
            Ovis2ForConditionalGeneration.from_pretrained(str(directory))


def test_cpu_weights_are_aligned(tiny_checkpoints):
    """safetensors places tensors at arbitrary file offsets; kernels' results may depend on alignment."""
    model = Ovis2ForConditionalGeneration.from_pretrained(str(tiny_checkpoints["stride2_gqa_tied"]))
    offsets = {name: p.data_ptr() % 64 for name, p in model.named_parameters()}
    assert set(offsets.values()) == {0}, {k: v for k, v in offsets.items() if v}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_own_their_memory(tiny_checkpoints):
    """safetensors hands out views of the file's mapping: a kept view would hold the whole file resident (beside
    the packed copies) for the model's lifetime; once loaded, the model maps no checkpoint file."""
    directory = tiny_checkpoints["stride2_gqa_tied"]
    model = Ovis2ForConditionalGeneration.from_pretrained(str(directory))
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(directory) in line]
    assert not mapped and model.lm_head.weight.numel()
