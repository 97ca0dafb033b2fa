"""The server hands decoded images to the processor as they are: the processor's compat alone decides how
transparency becomes RGB, so a transparent image gives the server the pixels `LLM.chat` (prepare_chat on the same
PIL image) and, with compat "transformers", transformers' own Ovis2 image processor give it."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ovis2.image_processing import Ovis2ImageProcessor
from ovis2.processing import Ovis2Processor
from ovis2.tokenizer import CHAT_TEMPLATE, build_tokenizer
from server.media import ImageLoader, MediaPolicy
from tests.processing_helpers import float32_rounding, transformers_image_processor
from tests.server.conftest import data_url


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _rgba() -> Image.Image:
    """Red under alpha that runs from transparent (left) to opaque (right), with green in the transparent half."""
    rng = np.random.default_rng(0)
    array = np.zeros((90, 160, 4), dtype=np.uint8)
    array[..., 0] = 220
    array[:, :80, 1] = rng.integers(0, 256, (90, 80))
    array[..., 3] = np.linspace(0, 255, 160).astype(np.uint8)[None, :]
    return Image.fromarray(array, "RGBA")


def _palette() -> Image.Image:
    """A palette image whose index 0 (blue) is transparent (PNG tRNS)."""
    image = Image.new("P", (120, 70), 0)
    image.putpalette([0, 0, 255, 250, 250, 0] + [0] * 762)
    image.paste(1, (60, 0, 120, 70))
    image.info["transparency"] = 0
    return image


def _grey_alpha() -> Image.Image:
    return _rgba().convert("LA")


TRANSPARENT_PNGS = {"rgba": _rgba, "palette": _palette, "la": _grey_alpha}


@pytest.fixture(scope="module")
def processors() -> dict[str, Ovis2Processor]:
    tokenizer = build_tokenizer()
    return {
        compat: Ovis2Processor(Ovis2ImageProcessor(compat=compat), tokenizer, CHAT_TEMPLATE)
        for compat in ("ovis", "transformers")
    }


def _messages(image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}]


def _through_the_server(processor: Ovis2Processor, png: bytes) -> torch.Tensor:
    """The chat route's steps: the loader decodes under the pixel budget, the processor builds the inputs."""

    async def run():
        async with ImageLoader(MediaPolicy()).decoded([(data_url(png), "p")]) as images:
            return processor.prepare_chat(_messages(images[0])).images[0].pixel_values

    return asyncio.run(run())


def _directly(processor: Ovis2Processor, png: bytes) -> torch.Tensor:
    """`LLM.chat`'s path: prepare_chat on the PIL image the file opens to."""
    return processor.prepare_chat(_messages(Image.open(io.BytesIO(png)))).images[0].pixel_values


@pytest.mark.parametrize("compat", ["ovis", "transformers"])
@pytest.mark.parametrize("name", sorted(TRANSPARENT_PNGS))
def test_the_server_gives_the_processor_the_pixels_llm_chat_gives_it(processors, compat, name):
    png = _png(TRANSPARENT_PNGS[name]())
    processor = processors[compat]
    assert torch.equal(_through_the_server(processor, png), _directly(processor, png))


@pytest.mark.parametrize("name", sorted(TRANSPARENT_PNGS))
def test_the_server_matches_transformers_on_transparent_images(processors, name):
    png = _png(TRANSPARENT_PNGS[name]())
    ours = _through_the_server(processors["transformers"], png)
    expected = transformers_image_processor()(Image.open(io.BytesIO(png)), return_tensors="pt")[
        "pixel_values"
    ]
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= float32_rounding(expected)  # the same uint8 pixels


def test_the_content_hash_tells_transparent_images_apart(processors):
    """Two files whose RGB is the same and whose alpha differs give different pixels (transformers), so the visual
    and prefix caches must not take one for the other."""
    opaque = _rgba()
    opaque.putalpha(255)
    processor = processors["transformers"]

    async def hashes():
        urls = [(data_url(_png(_rgba())), "a"), (data_url(_png(opaque)), "b")]
        async with ImageLoader(MediaPolicy()).decoded(urls) as images:
            return [processor.prepare_chat(_messages(image)).images[0].content_hash for image in images]

    first, second = asyncio.run(hashes())
    assert first != second
