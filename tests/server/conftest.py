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
from tests.live_server import LiveServer
from tests.server.fake_engine import FakeEngine


def pytest_collection_modifyitems(items) -> None:
    """The test that stops the shared live server runs after every other test that uses it, whatever the files."""
    items.sort(key=lambda item: item.get_closest_marker("stops_live_server") is not None)


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
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url, **image_url}},
        ],
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny compressed row: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


class ImageServer:
    """A local HTTP server for image URLs on `host`: /img.png, /redirect?to=URL, /loop, /big, /slow?s=SECONDS,
    /status/N, and whatever a test puts in `files` ({path: (body, content type)}). Records (path, headers) of
    every request."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.host = host
        self.requests: list[tuple[str, dict]] = []
        self.png = image_bytes(size=(40, 30), color=(10, 200, 10))
        self.files: dict[str, tuple[bytes, str]] = {}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                from urllib.parse import parse_qs, urlsplit

                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                server.requests.append((self.path, dict(self.headers)))
                route = parts.path
                try:
                    if route == "/img.png":
                        self._send(200, server.png, "image/png")
                    elif route in server.files:
                        self._send(200, *server.files[route])
                    elif route == "/redirect":
                        self._redirect(query["to"])
                    elif route == "/loop":
                        self._redirect("/loop")
                    elif route == "/big":  # no Content-Length: only the streamed byte count can stop it
                        self.send_response(200)
                        self.send_header("Content-Type", "image/png")
                        self.end_headers()
                        for _ in range(64):
                            self.wfile.write(b"\0" * 65536)
                    elif route == "/slow":
                        import time

                        time.sleep(float(query.get("s", "3")))
                        self._send(200, server.png, "image/png")
                    elif route.startswith("/status/"):
                        self._send(int(route.rsplit("/", 1)[1]), b"nope", "text/plain")
                    else:
                        self._send(404, b"not found", "text/plain")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


LIVE_VIDEO_LIMITS = {
    "--max-video-bytes": 300_000,
    "--max-video-seconds": 30,
    "--max-video-stream-frames": 200,
    "--max-video-frame-pixels": 100_000,
}  # small, so that a test makes videos past them cheaply


@pytest.fixture(scope="session")
def live_server(image_server) -> Iterator[LiveServer]:
    """The one shared real server for every end-to-end test (a test marked `stops_live_server` runs last)."""
    video_limits = [str(item) for flag in LIVE_VIDEO_LIMITS.items() for item in flag]
    server = LiveServer(
        ["--allowed-media-networks", "127.0.0.1", "--shutdown-grace-seconds", "20", *video_limits]
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()
