"""server/media/: fetching and decoding images safely."""

from __future__ import annotations

import asyncio
import gzip
import io
import ipaddress
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

from server.errors import APIError
from server.media import ImageLoader, MediaError, MediaPolicy, address_problem, decode_image, host_allowed
from server.media.byte_budget import MediaBytesBudget
from tests.server.conftest import data_url, image_bytes, png_header_only

LOCAL = (ipaddress.ip_network("127.0.0.1/32"),)


def load(url: str, **policy) -> Image.Image:
    return asyncio.run(ImageLoader(MediaPolicy(**policy)).load(url, "p"))


async def _decode_all(loader: ImageLoader, urls: list[tuple[str, str]]) -> list[Image.Image]:
    async with loader.decoded(urls) as images:
        return images


def refused(url: str, words: str, **policy) -> MediaError:
    with pytest.raises(MediaError) as info:
        load(url, **policy)
    assert words.lower() in info.value.message.lower(), info.value.message
    assert info.value.status == 400 and info.value.param == "p"
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_decodes_common_formats(fmt):
    data = image_bytes(fmt, size=(7, 5))
    image = decode_image(data, 10_000)
    assert image.size == (7, 5) and image.mode == Image.open(io.BytesIO(data)).mode  # the processor converts
    red, green, blue = image.convert("RGB").getpixel((3, 2))
    assert red > 150 and green < 80 and blue < 80


@pytest.mark.parametrize("frames", [1, 3])
def test_a_decoded_webp_keeps_its_pixels_and_lets_go_of_its_decoder(frames):
    """Pillow's loaded WebP holds its decoder's canvas and frame besides the pixels (36 MP: 627 MB held, 352 MB
    for the pixels alone): the loader keeps a plain copy."""
    colors = [(200, 30, 40), (0, 0, 255), (0, 255, 0)][:frames]
    images = [Image.new("RGB", (9, 6), color) for color in colors]
    buffer = io.BytesIO()
    images[0].save(buffer, format="WEBP", lossless=True, save_all=True, append_images=images[1:])
    decoded = decode_image(buffer.getvalue(), 10_000)
    assert type(decoded) is Image.Image and decoded.size == (9, 6)
    assert decoded.convert("RGB").tobytes() == images[0].tobytes()


def test_one_pixel_image():
    assert load(data_url(image_bytes(size=(1, 1)))).size == (1, 1)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue(), 10_000)
    red, _, blue = image.convert("RGB").getpixel((0, 0))
    assert red > 200 and blue < 60


def test_refuses_other_formats_bombs_and_corrupt_files():
    with pytest.raises(MediaError, match="not a png"):
        decode_image(image_bytes("TIFF"), 10_000)
    with pytest.raises(MediaError, match="pixels"):
        decode_image(png_header_only(100_000, 100_000), 40_000_000)
    with pytest.raises(MediaError, match="pixels"):
        decode_image(png_header_only(30_000, 30_000), 40_000_000)
    with pytest.raises(MediaError, match="corrupt"):
        decode_image(image_bytes(size=(64, 64))[:100], 10_000)
    with pytest.raises(MediaError, match="corrupt"):
        decode_image(image_bytes("JPEG", size=(64, 64))[:300], 10_000)
    with pytest.raises(MediaError, match="empty"):
        decode_image(b"", 10)


def test_data_url_rules():
    assert load(
        "data:image/jpeg;base64," + data_url(image_bytes("JPEG"))[len("data:image/png;base64,") :]
    ).size
    refused("data:image/svg+xml;base64,PHN2Zz4=", "svg")
    refused("data:image/png;base64," + "A" * 2000, "longer than", max_image_bytes=1000)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("127.0.0.1", "private"),
        ("::1", "private"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.1.1", "private"),
        ("fe80::1", "private"),
        ("fc00::1", "private"),
        ("fec0::1", "private"),
        ("100.64.0.1", "non-global"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("2002:a00:1::", "private"),
        ("240.0.0.1", "address"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_rules(address, problem):
    found = address_problem(ipaddress.ip_address(address), MediaPolicy())
    assert (found is None) if problem is None else (problem in found)


def test_operator_can_loosen_address_rules():
    private = MediaPolicy(allow_private=True)
    assert address_problem(ipaddress.ip_address("10.0.0.1"), private) is None
    assert "metadata" in address_problem(ipaddress.ip_address("169.254.169.254"), private)
    assert address_problem(ipaddress.ip_address("127.0.0.1"), MediaPolicy(allowed_networks=LOCAL)) is None
    assert address_problem(ipaddress.ip_address("127.0.0.2"), MediaPolicy(allowed_networks=LOCAL)) is not None


def test_domain_allow_list():
    policy = MediaPolicy(allowed_domains=("images.example.com", "*.cdn.example.org"))
    assert host_allowed("images.example.com", policy) and host_allowed("IMAGES.example.com.", policy)
    assert host_allowed("a.b.cdn.example.org", policy)
    assert not host_allowed("cdn.example.org", policy) and not host_allowed("evil.com", policy)
    assert not host_allowed("images.example.com.evil.com", policy)
    assert host_allowed("anything", MediaPolicy())


def test_fetches_from_an_explicitly_allowed_local_server(image_server):
    assert load(image_server.url("/img.png"), allowed_networks=LOCAL).size == (40, 30)
    refused(image_server.url("/img.png"), "private")


def test_localhost_name_is_pinned_to_the_checked_address(image_server):
    url = f"http://localhost:{image_server.port}/img.png?pinned"
    assert load(url, allowed_networks=LOCAL).size == (40, 30)
    path, headers = image_server.requests[-1]
    assert path == "/img.png?pinned" and headers["Host"] == f"localhost:{image_server.port}"


def test_redirects_are_rechecked(image_server):
    target = image_server.url("/img.png")
    assert load(image_server.url(f"/redirect?to={target}"), allowed_networks=LOCAL).size == (40, 30)
    assert load(image_server.url("/redirect?to=/img.png"), allowed_networks=LOCAL).size == (40, 30)
    refused(image_server.url("/redirect?to=http://169.254.169.254/latest"), "metadata", allow_private=True)
    refused(image_server.url("/redirect?to=http://10.0.0.1/x.png"), "private", allowed_networks=LOCAL)
    refused(image_server.url("/redirect?to=file:///etc/passwd"), "http(s)", allowed_networks=LOCAL)
    refused(image_server.url("/redirect?to=http://[::1/x.png"), "could not fetch", allowed_networks=LOCAL)
    for location in ("data:image/png;base64,iVBORw0KGgo=", "mailto:a@b.c"):  # httpx cannot even parse these
        redirect = image_server.url("/redirect?to=" + quote(location, safe=""))
        refused(redirect, "redirected to a URL that cannot be fetched", allowed_networks=LOCAL)
    refused(image_server.url("/loop"), "redirected more than 3", allowed_networks=LOCAL)
    two_hops = image_server.url("/redirect?to=" + image_server.url(f"/redirect?to={target}"))
    refused(two_hops, "more than 1", allowed_networks=LOCAL, max_redirects=1)


def test_byte_cap_while_streaming(image_server):
    refused(image_server.url("/big"), "larger than", allowed_networks=LOCAL, max_image_bytes=200_000)
    refused(image_server.url("/img.png"), "larger than", allowed_networks=LOCAL, max_image_bytes=10)


def test_media_bytes_past_the_budget_are_refused_with_a_503_and_given_back(image_server):
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    size, url = len(buffer.getvalue()), data_url(buffer.getvalue())
    budget = MediaBytesBudget(size + 1000)
    loader = ImageLoader(MediaPolicy(allowed_networks=LOCAL))

    async def scenario():
        first, second = budget.hold(), budget.hold()
        (await loader.open(url, "p", first)).close()
        assert budget.in_use == size == first.held
        for source in (url, image_server.url("/big")):  # decoded from base64, or as it streams in
            with pytest.raises(APIError) as info:
                await loader.open(source, "p", second)
            assert info.value.status == 503 and "retry" in info.value.message
        first.release()
        second.release()
        assert budget.in_use == 0
        (await loader.open(url, "p", second)).close()  # room again
        with pytest.raises(APIError) as info:  # this request alone is past the budget: no retry would help
            await loader.open(url, "p", second)
        assert info.value.status == 400 and "more than the" in info.value.message
        second.release()

    asyncio.run(scenario())


def test_total_timeout(image_server):
    start = time.monotonic()
    refused(image_server.url("/slow?s=3"), "longer than", allowed_networks=LOCAL, fetch_timeout=0.5)
    assert time.monotonic() - start < 2


def test_http_errors(image_server):
    refused(image_server.url("/status/404"), "HTTP 404", allowed_networks=LOCAL)
    refused(f"http://127.0.0.1:{_free_port()}/x.png", "could not fetch", allowed_networks=LOCAL)


def test_fetches_run_concurrently(image_server):
    loader = ImageLoader(MediaPolicy(allowed_networks=LOCAL))
    urls = [(image_server.url(f"/slow?s=0.6&i={i}"), f"p{i}") for i in range(4)]
    start = time.monotonic()
    images = asyncio.run(_decode_all(loader, urls))
    assert len(images) == 4 and time.monotonic() - start < 2.0


def test_hanging_dns_does_not_take_the_shared_thread_pool(monkeypatch):
    """Lookups for hosts whose DNS never answers hold their thread long after the fetch timed out; in asyncio's
    default pool (6 threads on 2 cores) they queued every image decode and prompt build behind them."""
    release = threading.Event()

    def hanging_getaddrinfo(*args, **kwargs):
        release.wait(10)
        raise socket.gaierror("no answer")

    async def main() -> float:
        loader = ImageLoader(MediaPolicy(fetch_timeout=0.2))
        fetches = [loader.load(f"http://h{i}.example/a.png") for i in range(40)]
        failures = await asyncio.gather(*fetches, return_exceptions=True)
        assert all(isinstance(f, MediaError) and "longer than" in f.message for f in failures)
        start = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        return time.monotonic() - start

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    try:
        assert asyncio.run(asyncio.wait_for(main(), 8)) < 1
    finally:
        release.set()


def test_https_connects_to_the_checked_ip_with_sni():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(
            url=str(request.url), host=request.headers["host"], sni=request.extensions.get("sni_hostname")
        )
        return httpx.Response(200, content=image_bytes())

    loader = ImageLoader(MediaPolicy(allowed_networks=LOCAL), transport=httpx.MockTransport(handler))
    asyncio.run(loader.load("https://localhost:8443/a.png?x=1"))
    assert seen == {"url": "https://127.0.0.1:8443/a.png?x=1", "host": "localhost:8443", "sni": "localhost"}


def test_compressed_responses_are_refused_not_inflated():
    """httpx would inflate Content-Encoding (nested: gzip, gzip) before the byte cap saw it: 1 KB became 800 MB."""
    seen = {}
    bomb = gzip.compress(gzip.compress(b"\0" * 5_000_000))

    def handler(request: httpx.Request) -> httpx.Response:
        seen["accept-encoding"] = request.headers.get("accept-encoding")
        return httpx.Response(200, stream=httpx.ByteStream(bomb), headers={"Content-Encoding": "gzip, gzip"})

    loader = ImageLoader(
        MediaPolicy(allowed_networks=LOCAL, max_image_bytes=1000), transport=httpx.MockTransport(handler)
    )
    with pytest.raises(MediaError, match="Content-Encoding"):
        asyncio.run(loader.load("http://127.0.0.1/a.png"))
    assert seen["accept-encoding"] == "identity"

    def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=image_bytes(), headers={"Content-Encoding": "identity"})

    assert asyncio.run(
        ImageLoader(MediaPolicy(allowed_networks=LOCAL), transport=httpx.MockTransport(plain)).load(
            "http://127.0.0.1/a.png"
        )
    ).size == (32, 24)


def test_file_urls_only_inside_the_allowed_directory(tmp_path: Path):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "a.png").write_bytes(image_bytes())
    (tmp_path / "secret.png").write_bytes(image_bytes())
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    refused((inside / "a.png").as_uri(), "disabled")
    assert load((inside / "a.png").as_uri(), local_dir=inside).size == (32, 24)
    refused(f"file://{inside}/../secret.png", "inside the allowed", local_dir=inside)
    refused((inside / "link.png").as_uri(), "inside the allowed", local_dir=inside)


def test_bad_file_urls_are_400(tmp_path: Path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    refused(f"file://{tmp_path}/%00a.png", "file://", local_dir=tmp_path)
    refused(f"file://[x/{tmp_path}/a.png", "file://", local_dir=tmp_path)
    refused((tmp_path / "loop.png").as_uri(), "file://", local_dir=tmp_path)
    (tmp_path / "big.png").write_bytes(b"\0" * 2000)
    refused((tmp_path / "big.png").as_uri(), "larger than", local_dir=tmp_path, max_image_bytes=1000)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unresolvable_and_private_names_get_the_same_answer(monkeypatch):
    """Otherwise a client could map which internal names exist from the error text."""

    def fake_getaddrinfo(host, port, type=0):
        if host == "nowhere.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    missing = refused("http://nowhere.example/x.png", "public address")
    private = refused("http://intranet.example/x.png", "public address")
    assert missing.message.replace("nowhere", "NAME") == private.message.replace("intranet", "NAME")


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to display)."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    picture = Image.new("RGB", (300, 100), (200, 30, 30))
    picture.paste((10, 10, 240), (0, 0, 30, 100))  # a blue band on the left edge
    picture.save(buffer, format="JPEG", exif=exif.tobytes())
    image = decode_image(buffer.getvalue(), 10**6)
    assert image.size == (100, 300) and image.mode == "RGB"
    red, green, blue = image.getpixel((50, 10))  # the left band is on top once rotated clockwise
    assert blue > 200 and red < 60
