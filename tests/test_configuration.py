"""Configs: both formats, validation, and the six released sizes."""

from __future__ import annotations

import pytest

from ovis2.configuration import OVIS2_SIZES, Ovis2Config, config_for_size
from ovis2.errors import Ovis2Error
from ovis2.meta_build import build_on_meta
from ovis2.modeling import Ovis2ForConditionalGeneration

PARAMS_BILLIONS = {"1B": 1.13, "2B": 2.22, "4B": 4.31, "8B": 8.94, "16B": 16.2, "34B": 34.9}  # ovis2-model.md


@pytest.mark.parametrize("size", OVIS2_SIZES)
def test_each_size_builds_on_meta_with_the_right_parameter_count(size):
    config = config_for_size(size)
    model = build_on_meta(lambda: Ovis2ForConditionalGeneration(config))
    if config.tie_word_embeddings:
        model.tie_weights()
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(count - PARAMS_BILLIONS[size]) / PARAMS_BILLIONS[size] < 0.01


def test_hf_dict_roundtrip():
    config = config_for_size("2B")
    assert Ovis2Config.from_dict(config.to_dict()) == config


def test_original_format_is_read():
    llm = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_theta": 1e6,
    }
    backbone = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    source = {
        "model_type": "ovis",
        "llm_config": llm,
        "visual_tokenizer_config": {"backbone_config": backbone, "vocab_size": 69, "hidden_stride": 2},
    }
    config = Ovis2Config.from_dict(source)
    assert config.source_format == "ovis"
    assert config.vision_config.hidden_stride == 2 and config.text_config.num_key_value_heads == 2
    assert config.to_dict()["model_type"] == "ovis2"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "model_type"),
        (lambda c: c["vision_config"].pop("hidden_size"), "vision_config.hidden_size"),
        (lambda c: c["text_config"].update(num_attention_heads=5), "text_config.hidden_size"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda c: c["vision_config"].update(tokenize_function="argmax"), "tokenize_function"),
        (lambda c: c["text_config"].update(num_hidden_layers=0), "text_config.num_hidden_layers"),
        (lambda c: c["text_config"].update(rope_theta="abc"), "text_config.rope_theta"),
        (lambda c: c["text_config"].update(rms_norm_eps=0), "text_config.rms_norm_eps"),
        (lambda c: c["vision_config"].update(rms_norm_eps=float("nan")), "vision_config.rms_norm_eps"),
        (lambda c: c.update(text_config="oops"), "'config.text_config' must be an object"),
        (lambda c: c.update(image_token_id="x"), "image_token_id"),
        (lambda c: c.update(visual_indicator_token_ids=5), "visual_indicator_token_ids"),
        (lambda c: c.update(visual_indicator_token_ids=[1, 2, 3, 4, -5]), "visual_indicator_token_ids"),
    ],
)
def test_bad_fields_are_named(edit, message):
    source = config_for_size("1B").to_dict()
    edit(source)
    with pytest.raises(Ovis2Error, match=message):
        Ovis2Config.from_dict(source)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b"null", b"\xff\xfe{}"])
def test_a_config_file_that_is_not_an_object_is_named(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(Ovis2Error, match="config.json"):
        Ovis2Config.from_pretrained(tmp_path)
