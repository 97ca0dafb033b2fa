"""Fixtures for the server tests: a fake engine behind a TestClient, image bytes, a local image server."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ovis2.tokenizer import build_tokenizer
from server.app import create_app
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def fake_engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer=tokenizer)


@pytest.fixture
def make_client(fake_engine) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a started TestClient on a fresh app around `fake_engine`."""
    clients = []

    def make(engine: FakeEngine | None = None, **overrides) -> TestClient:
        settings = ServerSettings(_env_file=None, **{"served_model_name": "fake-model", **overrides})
        client = TestClient(create_app(settings, engine or fake_engine), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What is in this image?", **image_url) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url, **image_url}}]}  # fmt: skip
