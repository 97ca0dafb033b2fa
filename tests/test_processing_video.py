"""Video parts and the multi-image tile budget in Ovis2Processor, against the original recipe rebuilt here by hand.

The original (AIDC-AI/Ovis v2.0, docs/video.md): the query is `"\\n".join(["<image>"] * n) + "\\n" + text`, the
conversation formatter tokenizes each piece between `<image>` markers on its own, and each marker becomes the
frame's placeholder: START, 256 atoms, GRID, END (max_partition=1)."""

from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest
from PIL import Image

from ovis2.errors import Ovis2Error
from ovis2.image_processing import Ovis2ImageProcessor
from ovis2.processing import Ovis2Processor
from ovis2.tokenizer import CHAT_TEMPLATE, build_tokenizer
from tests.test_video_sampling import model_card_indices

ATOM, START, GRID, END = 151665, 151666, 151667, 151670  # <IMG_ATOM>, <IMG_START>, <IMG_GRID>, <IMG_END>
ONE_CROP = [START, *[ATOM] * 256, GRID, END]
TEXT = "Describe the video."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def ovis(tokenizer):
    return Ovis2Processor(Ovis2ImageProcessor(), tokenizer, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def transformers_like(tokenizer):
    return Ovis2Processor(Ovis2ImageProcessor(compat="transformers"), tokenizer, CHAT_TEMPLATE)


def original_ids(tokenizer, turns: list[tuple[str, str]], num_frames: int) -> list[int]:
    """The original QwenConversationFormatter + preprocess_inputs: each turn is role header + value + <|im_end|>,
    the default system turn first, the generation prompt last; text between <image> markers tokenized piece by
    piece; each marker replaced by a one-crop placeholder."""
    roles = {
        "system": "<|im_start|>system\n",
        "human": "<|im_start|>user\n",
        "gpt": "<|im_start|>assistant\n",
    }
    texts = [roles["system"] + "You are a helpful assistant." + "<|im_end|>\n"]
    texts += [roles[who] + value + "<|im_end|>\n" for who, value in turns]
    texts.append(roles["gpt"])
    ids = []
    for text in texts:
        pieces = text.split("<image>")
        for index, piece in enumerate(pieces):
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            if index < len(pieces) - 1:
                ids += ONE_CROP
    assert ids.count(START) == num_frames
    return ids


def decoded_frames(data: bytes) -> list[Image.Image]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_image() for f in sorted(container.decode(video=0), key=lambda f: f.pts)]


def video_message(video, text: str = TEXT, **extra) -> dict:
    return {
        "role": "user",
        "content": [{"type": "video", "video": video, **extra}, {"type": "text", "text": text}],
    }


@pytest.mark.parametrize("name", ["h264", "vp9", "mpeg4"])
def test_compat_ovis_video_prompt_is_the_original_recipes(ovis, tokenizer, videos, name):
    data = getattr(videos, name)
    inputs = ovis.prepare_chat([video_message(data)])
    query = "\n".join(["<image>"] * 12) + "\n" + TEXT  # the model card's query
    assert inputs.prompt_token_ids == original_ids(tokenizer, [("human", query)], 12)
    frames = decoded_frames(data)
    assert len(inputs.images) == inputs.num_video_frames == 12
    for image, index in zip(inputs.images, model_card_indices(len(frames), 12), strict=True):
        pixels, grid = ovis.image_processor.preprocess_image(frames[index], max_patches=1)
        assert image.grid == tuple(grid) == (1, 1) and image.is_video_frame and image.num_tokens == 259
        assert np.array_equal(image.pixel_values.numpy(), np.asarray(pixels, dtype=np.float32))


def test_one_frame_and_a_later_turn(ovis, tokenizer, videos):
    messages = [
        video_message(videos.one_frame, "What is it?"),
        {"role": "assistant", "content": "A gray card."},
        video_message(videos.h264, "And now?", num_frames=3),
    ]
    inputs = ovis.prepare_chat(messages)
    turns = [
        ("human", "<image>\nWhat is it?"),
        ("gpt", "A gray card."),
        ("human", "<image>\n<image>\n<image>\nAnd now?"),
    ]
    assert inputs.prompt_token_ids == original_ids(tokenizer, turns, 4)
    assert [image.is_video_frame for image in inputs.images] == [True] * 4


def test_counting_tokens_agrees_with_the_prompt_and_decodes_nothing(ovis, transformers_like, videos):
    messages = [video_message(videos.vp9)]
    for processor in (ovis, transformers_like):  # one crop a frame in both compats
        ids = processor.prepare_chat(messages).prompt_token_ids
        counted = [
            {
                **messages[0],
                "content": [
                    {"type": "video", "num_frames": 12, "frame_size": (64, 48)},
                    messages[0]["content"][1],
                ],
            }
        ]
        assert processor.chat_token_ids(counted) == (ids, 12 * 259)
        assert processor.chat_token_ids(messages) == (ids, 12 * 259)  # from the video itself, too


def test_frame_lists_and_rendered_text(ovis, videos):
    frames = [Image.new("RGB", (32, 32), (i * 8, 0, 0)) for i in range(20)]
    inputs = ovis.prepare_chat([video_message(frames, num_frames=4)])
    picked = [
        int(image.content_hash == ovis.content_hash(frames[i], 1, 1))
        for image, i in zip(inputs.images, model_card_indices(20, 4), strict=True)
    ]
    assert picked == [1, 1, 1, 1]
    text = ovis.apply_chat_template([video_message(videos.one_frame)], tokenize=False)
    assert text.endswith("<|im_start|>user\n<image>\n" + TEXT + "<|im_end|>\n<|im_start|>assistant\n")


def test_the_same_video_gives_the_same_frame_hashes(ovis, videos):
    first = [image.content_hash for image in ovis.prepare_chat([video_message(videos.h264)]).images]
    again = [image.content_hash for image in ovis.prepare_chat([video_message(bytes(videos.h264))]).images]
    assert first == again and len(set(first)) == 12  # 12 different frames, each keyed by its pixels


@pytest.mark.parametrize(
    "part, message",
    [
        ({"type": "video"}, "needs its video"),
        ({"type": "video", "video": b"x", "num_frames": 0}, "num_frames must be a positive integer"),
        ({"type": "video", "video": b"x", "frames": 3}, "not frames"),
    ],
)
def test_bad_video_parts(ovis, part, message):
    with pytest.raises(Ovis2Error, match=message):
        ovis.prepare_chat([{"role": "user", "content": [part]}])


# ------------------------------------------------------------------------- the multi-image tile budget


def images_message(*images) -> dict:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": "?"}],
    }


WIDE = Image.new("RGB", (1792, 1344), (10, 20, 30))  # 4:3 and large: 9 tiles would cover it better than 4


def tiles(inputs) -> list[int]:
    return [image.grid[0] * image.grid[1] for image in inputs.images]


def test_compat_ovis_gives_each_of_several_images_four_tiles_as_the_model_card(
    ovis, transformers_like, videos
):
    alone = tiles(ovis.prepare_chat([images_message(WIDE)]))[0]
    four = math.prod(ovis.image_processor.grid_for_size(*WIDE.size, 4))
    assert 4 < alone <= 9 and four <= 4
    assert tiles(ovis.prepare_chat([images_message(WIDE, WIDE)])) == [four, four]
    assert tiles(ovis.prepare_chat([images_message(WIDE, WIDE)], max_patches=9)) == [
        alone,
        alone,
    ]  # the call asks
    with_video = ovis.prepare_chat([images_message(WIDE), video_message(videos.one_frame)])
    assert tiles(with_video)[0] == alone  # video frames are not images
    both = transformers_like.prepare_chat([images_message(WIDE, WIDE)])
    assert (
        tiles(both) == tiles(transformers_like.prepare_chat([images_message(WIDE)])) * 2
    )  # transformers: as before
    counted, _ = ovis.chat_token_ids([images_message(WIDE, WIDE)])
    assert counted == ovis.prepare_chat([images_message(WIDE, WIDE)]).prompt_token_ids


def test_an_operator_tile_cap_wins_over_the_multi_image_budget(tokenizer):
    capped = Ovis2Processor(Ovis2ImageProcessor(max_patches=9), tokenizer, CHAT_TEMPLATE)
    alone = tiles(capped.prepare_chat([images_message(WIDE)]))[0]
    assert tiles(capped.prepare_chat([images_message(WIDE, WIDE)])) == [alone, alone] and alone > 4
