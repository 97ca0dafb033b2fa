"""Ovis2Processor's padding and truncation arguments mean what they mean to the tokenizer (and to transformers'
Ovis2Processor, which hands them to it), except that an image's placeholder span is never cut."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ovis2.errors import Ovis2Error
from ovis2.image_processing import Ovis2ImageProcessor
from ovis2.processing import Ovis2Processor
from ovis2.tokenizer import CHAT_TEMPLATE, build_tokenizer
from tests.processing_helpers import transformers_image_processor

TEXTS = [
    "<|im_start|>user\nDescribe a cup of coffee in some detail, please.<|im_end|>\n<|im_start|>assistant\n",
    "Hi",
    "Three small words",
]
LAYOUTS = [
    {"padding": True},
    {"padding": "longest", "padding_side": "right"},
    {"padding": "max_length", "max_length": 40},
    {"padding": "max_length", "max_length": 5, "truncation": False},  # longer rows stay, shorter ones pad
    {"padding": False},
    {"padding": "do_not_pad"},
    {"truncation": True, "max_length": 4, "padding": False},
    {"truncation": "longest_first", "max_length": 6, "padding": True},
    {"truncation": "only_first", "max_length": 6, "padding": "max_length", "padding_side": "right"},
    {"truncation": "do_not_truncate", "max_length": 3, "padding": True},
    {"truncation": True, "padding": "longest"},  # up to model_max_length: nothing to cut
    {"max_length": 3, "padding": False},  # max_length alone turns truncation on
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "return_attention_mask": False},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Ovis2Processor(Ovis2ImageProcessor(compat="transformers"), tokenizer, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def reference(tokenizer):
    from transformers.models.ovis2.processing_ovis2 import Ovis2Processor as TransformersProcessor

    return TransformersProcessor(transformers_image_processor(), tokenizer, chat_template=CHAT_TEMPLATE)


@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=lambda layout: ",".join(f"{k}={v}" for k, v in layout.items())
)
def test_text_prompts_are_padded_and_cut_as_the_tokenizer_does(processor, tokenizer, layout):
    expected = tokenizer(TEXTS, add_special_tokens=False, **layout)
    ours = processor(text=TEXTS, return_tensors=None, **layout)
    assert ours["input_ids"] == expected["input_ids"]
    assert ("attention_mask" in ours) == ("attention_mask" in expected)
    if "attention_mask" in expected:
        assert ours["attention_mask"] == expected["attention_mask"]


def test_without_padding_arguments_a_batch_is_left_padded_to_its_longest_prompt(processor, tokenizer):
    assert tokenizer.padding_side == "left"  # what transformers' Ovis2 pads with: the tokenizer's side
    ours = processor(text=TEXTS)
    expected = tokenizer(TEXTS, add_special_tokens=False, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["attention_mask"], expected["attention_mask"])
    assert ours["attention_mask"][1, 0] == 0 and ours["attention_mask"][1, -1] == 1


def test_max_length_alone_truncates_as_for_the_tokenizer(processor, tokenizer):
    ours = processor(text=TEXTS, max_length=3, return_tensors=None)
    expected = tokenizer(TEXTS, add_special_tokens=False, max_length=3, truncation=True, padding=True)
    assert ours["input_ids"] == expected["input_ids"] and ours["attention_mask"] == expected["attention_mask"]


def test_an_unpadded_ragged_batch_cannot_be_a_tensor(processor):
    with pytest.raises(Ovis2Error, match="padding=True"):
        processor(text=TEXTS, padding=False, return_tensors="pt")


def _image_prompts(processor):
    images = [Image.new("RGB", (896, 448), "red"), Image.new("RGB", (300, 200), "blue")]
    first = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "What colour is it? Answer in one word."},
                ],
            }
        ]
    )
    second = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And"},
                    {"type": "image"},
                    {"type": "text", "text": "this?"},
                ],
            }
        ]
    )
    return images, [first, second]


@pytest.mark.parametrize(
    "layout",
    [
        {"padding": "longest", "padding_side": "right"},
        {"padding": "max_length", "max_length": 1200},
        {"padding": True, "pad_to_multiple_of": 64, "return_attention_mask": False},
    ],
)
def test_image_prompts_match_transformers(processor, reference, layout):
    images, texts = _image_prompts(processor)
    ours = processor(images=images, text=texts, return_tensors="pt", **layout)
    expected = reference(images=images, text=texts, return_tensors="pt", **layout)
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert ("attention_mask" in ours) == ("attention_mask" in expected)
    if "attention_mask" in expected:
        assert torch.equal(ours["attention_mask"], expected["attention_mask"])
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])


def test_truncating_image_prompts_cuts_their_text_as_transformers_does(processor, reference):
    images, texts = _image_prompts(processor)
    longest = max(len(ids) for ids in processor(images=images, text=texts, return_tensors=None)["input_ids"])
    layout = {"truncation": True, "max_length": longest - 3, "padding": "max_length", "padding_side": "right"}
    ours = processor(images=images, text=texts, return_tensors="pt", **layout)
    expected = reference(images=images, text=texts, return_tensors="pt", **layout)
    assert ours["input_ids"].shape[1] == longest - 3
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["attention_mask"], expected["attention_mask"])


def test_truncation_inside_an_image_is_refused(processor):
    images, texts = _image_prompts(processor)
    lengths = [len(ids) for ids in processor(images=images, text=texts, return_tensors=None)["input_ids"]]
    start = processor(text=[texts[0].split("<image>")[0]], return_tensors=None)["input_ids"][0]
    assert lengths[0] > len(start) + 300  # its image starts at len(start), hundreds of ids long
    with pytest.raises(Ovis2Error, match="would cut its image 0"):
        processor(images=images, text=texts, truncation=True, max_length=len(start) + 300)
    with pytest.raises(Ovis2Error, match="would cut its image 0"):  # dropping the whole span is no better
        processor(images=images, text=texts, truncation=True, max_length=len(start) - 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"padding": "bogus"},
        {"padding_side": "middle"},
        {"truncation": "only_second", "max_length": 4},
        {"truncation": "sideways"},
        {"max_length": -1},
        {"max_length": 2.5},
        {"pad_to_multiple_of": 0},
        {"truncation": True, "max_length": 10, "padding": True, "pad_to_multiple_of": 8},
    ],
)
def test_bad_padding_arguments_are_ovis2_errors(processor, bad):
    with pytest.raises(Ovis2Error):
        processor(text=TEXTS, **bad)


def test_unknown_keyword_arguments_are_named(processor):
    with pytest.raises(Ovis2Error, match="'strid'"):
        processor(text=TEXTS, padding=True, strid=2)
