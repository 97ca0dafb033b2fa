"""/tokenize counts image tokens from each image's size: no pixel is decoded, cropped, normalised or hashed."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageFile

from ovis2 import Ovis2Processor
from server.media import image as media_image
from tests.server.conftest import data_url, image_message


def oriented_image(fmt: str, width: int, height: int, orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, orientation", [("JPEG", 1), ("JPEG", 6), ("PNG", None), ("PNG", 8)])
def test_tokenize_counts_from_sizes_without_decoding(make_client, fake_engine, monkeypatch, fmt, orientation):
    processor = Ovis2Processor(tokenizer=fake_engine.tokenizer)
    fake_engine.processor = processor
    data = oriented_image(fmt, 1200, 500, orientation)
    with Image.open(io.BytesIO(data)) as decoded:  # what chat completions would build, from the decoded image
        upright = media_image.decode_pixels(decoded)
        message = {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image", "image": upright},
            ],
        }
        expected = processor.prepare_chat([message])

    def no_pixels(*args, **kwargs):
        raise AssertionError("/tokenize touched pixels")

    monkeypatch.setattr(processor.image_processor, "preprocess_image", no_pixels)
    monkeypatch.setattr(processor, "content_hash", no_pixels)
    monkeypatch.setattr(media_image, "decode_pixels", no_pixels)
    monkeypatch.setattr("server.media.loader.decode_pixels", no_pixels)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)  # PIL decodes in load(), whoever calls it
    client = make_client()
    url = data_url(data, f"image/{fmt.lower()}")
    body = client.post("/tokenize", json={"messages": [image_message(url)]}).json()
    assert body["image_tokens"] == expected.num_image_tokens
    assert body["tokens"] == expected.prompt_token_ids
