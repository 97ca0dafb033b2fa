"""Random text and random image chat requests, built before the run so encoding is never timed."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field

from PIL import Image

# Common English words, each a single token in Qwen2's vocabulary (with the leading space).
WORDS = (
    "the of and to in is for on that with as it was at by from this be are or an have not which one all"
    " can has more will about time new some what when other two out first also only year people other"
    " city water house light color green blue red small large river tree stone road cloud music"
).split()

IMAGE_MIME = "image/png"


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 32
    input_words: int = 32  # random words of text per request (about one token each)
    output_tokens: int = 32
    image_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) choices; empty: text only
    images_per_request: int = 0
    image_detail: str | None = None  # image_url.detail: "low" | "high" | "auto"
    seed: int = 0


@dataclass
class BenchRequest:
    messages: list[dict]
    max_tokens: int
    num_images: int = 0
    extra_body: dict = field(default_factory=dict)


def parse_image_size(text: str) -> tuple[int, int]:
    """'600x900' -> (600, 900): width x height."""
    width, _, height = text.lower().partition("x")
    size = (int(width), int(height))
    if min(size) < 1:
        raise ValueError(f"image size must be WIDTHxHEIGHT with positive sides, not {text!r}")
    return size


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def random_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A smooth random image: a coarse random grid upscaled, so it compresses well yet differs per seed."""
    coarse = bytes(rng.randrange(256) for _ in range(8 * 8 * 3))
    return Image.frombytes("RGB", (8, 8), coarse).resize(size, Image.Resampling.BILINEAR)


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:{IMAGE_MIME};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_part(url: str, detail: str | None) -> dict:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image_url}


def build_request(rng: random.Random, spec: WorkloadSpec) -> BenchRequest:
    num_images = spec.images_per_request if spec.image_sizes else 0
    parts = [
        image_part(image_data_url(random_image(rng, rng.choice(spec.image_sizes))), spec.image_detail)
        for _ in range(num_images)
    ]
    parts.append({"type": "text", "text": random_text(rng, spec.input_words)})
    content = parts if num_images else parts[0]["text"]
    messages = [{"role": "user", "content": content}]
    return BenchRequest(messages=messages, max_tokens=spec.output_tokens, num_images=num_images)


def build_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """Every request distinct (own text, own images), so no server-side cache makes it artificially fast."""
    rng = random.Random(spec.seed)
    return [build_request(rng, spec) for _ in range(spec.num_requests)]
