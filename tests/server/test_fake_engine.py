"""The fake engine the protocol tests run against lays images out as the real processor does."""

from PIL import Image

from ovis2 import Ovis2Processor
from ovis2.image_layout import END_ID, GRID_ID, START_ID
from tests.server.fake_engine import FakeProcessor


def test_the_fake_processor_lays_an_image_out_like_the_real_one():
    real = Ovis2Processor()
    fake = FakeProcessor(real.tokenizer)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (10, 10))}]}]
    ids = fake.prepare_chat(messages).prompt_token_ids
    one_crop = real.image_placeholder_ids((1, 1))
    assert one_crop[-2:] == [GRID_ID, END_ID]
    start = ids.index(START_ID)
    assert ids[start : start + len(one_crop)] == one_crop
    counted, image_tokens = fake.chat_token_ids(messages)
    assert counted == ids and image_tokens == len(one_crop)
