"""Images from `image_url` parts, fetched and decoded safely (see "Image inputs, safely" in the reference).

- `data:image/<png|jpeg|webp|gif|bmp>;base64,...` with a length cap.
- `http(s)://`: the host is resolved once and the connection goes to the address that was checked (the URL
  is rewritten to the IP, with the Host header and TLS SNI set to the name, so no second DNS lookup can
  swap in another address); private, loopback, link-local, multicast, reserved and cloud metadata addresses
  are refused unless the operator allows them; every redirect is checked again (at most a few); connect and
  total timeouts; the byte cap is enforced while streaming, on bytes that are never inflated (compressed
  responses are refused); an optional host allow-list.
- `file://` only inside a directory the operator names.
- Decoding runs in a thread: only common formats, the pixel count is checked from the header before the
  pixels are decoded, the first frame of animations, EXIF orientation applied, truncated or corrupt files are a 400.
- Decoded pixels held at once, across all requests, stay under a budget (server/pixel_budget.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import APIError
from .pixel_budget import PixelBudget, PixelBudgetExceeded
from .settings import ServerSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DATA_URL_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/x-ms-bmp"}
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_PIXELS_IN_FLIGHT = 400_000_000  # Pillow keeps RGB at 4 bytes a pixel: about 1.6 GB decoded
# getaddrinfo blocks a thread until the resolver gives up (tens of seconds for a host whose DNS never answers),
# long after the fetch timed out: in a pool of its own it cannot hold up image decoding and prompt building.
_DNS_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ovis2-dns")
logger = logging.getLogger(__name__)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.IGNORECASE)


class MediaError(APIError):
    """A bad image URL or image: a 400 naming the part it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, 400, param=param, code="invalid_image")


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    connect_timeout: float = 3.0
    fetch_timeout: float = 10.0
    max_redirects: int = 3
    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_private: bool = False
    local_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> MediaPolicy:
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_media_networks)
        except ValueError as exc:
            raise ValueError(f"allowed_media_networks: {exc}") from exc
        local_dir = settings.allowed_local_media_path
        return cls(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            connect_timeout=settings.media_connect_timeout,
            fetch_timeout=settings.media_fetch_timeout,
            max_redirects=settings.max_media_redirects,
            allowed_domains=tuple(d.lower().rstrip(".") for d in settings.allowed_media_domains),
            allowed_networks=networks,
            allow_private=settings.allow_private_media_addresses,
            local_dir=local_dir.resolve() if local_dir is not None else None,
        )

    @property
    def max_base64_chars(self) -> int:
        return (self.max_image_bytes + 2) // 3 * 4


# ------------------------------------------------------------------------------------------- address checks


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
        if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress, policy: MediaPolicy) -> str | None:
    """Why fetching from `ip` is refused, or None when it is allowed."""
    if any(ip in net for net in policy.allowed_networks if net.version == ip.version):
        return None
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return address_problem(embedded, policy)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_multicast or ip.is_unspecified:
        return "a multicast or unspecified address"
    if ip.is_loopback or ip.is_link_local or ip.is_private or getattr(ip, "is_site_local", False):  # fec0::/10
        return None if policy.allow_private else "a private, loopback or link-local address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved or non-global address"
    return None


def host_allowed(host: str, policy: MediaPolicy) -> bool:
    if not policy.allowed_domains:
        return True
    host = host.lower().rstrip(".")
    for pattern in policy.allowed_domains:
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
        if host == pattern:
            return True
    return False


async def resolve_checked(host: str, port: int, policy: MediaPolicy) -> IPAddress:
    """The first address of `host` that the policy allows; the fetch then connects to exactly that one.

    A name that does not resolve and a name that resolves only to refused addresses get the same answer, so
    clients cannot map which internal names exist; the log says which it was."""
    try:
        return _checked(ipaddress.ip_address(host), policy)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.run_in_executor(_DNS_THREADS, partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
    except (socket.gaierror, UnicodeError) as exc:
        logger.info("image host %r does not resolve: %s", host, exc)
        raise _unreachable(host) from exc
    problems = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        problem = address_problem(ip, policy)
        if problem is None:
            return ip
        problems.append(problem)
    logger.info("image host %r resolves to %s; refused", host, problems[0] if problems else "no address")
    raise _unreachable(host)


def _unreachable(host: str) -> MediaError:
    return MediaError(f"image host '{host}' does not resolve to a public address this server may fetch from")


def _checked(ip: IPAddress, policy: MediaPolicy) -> IPAddress:
    problem = address_problem(ip, policy)
    if problem is not None:
        raise MediaError(f"image URL points to {problem}; refused")
    return ip


# -------------------------------------------------------------------------------------------------- fetching


@dataclass
class ImageLoader:
    """Turns `image_url` URLs into RGB PIL images under a MediaPolicy."""

    policy: MediaPolicy = field(default_factory=MediaPolicy)
    transport: httpx.AsyncBaseTransport | None = None  # tests may inject one
    budget: PixelBudget = field(default_factory=lambda: PixelBudget(DEFAULT_PIXELS_IN_FLIGHT))

    @asynccontextmanager
    async def decoded(self, urls: list[tuple[str, str]]) -> AsyncIterator[list[Image.Image]]:
        """The images of every (url, param), decoded and held (against the pixel budget) until the block ends.

        All are fetched and their headers checked at once (the first failure in part order wins and names its
        part; the other fetches are cancelled); then the pixels of all of them are taken from the budget in one
        go, waiting for other requests to give theirs back when the budget is spent, and the images are decoded.
        Every image is closed when the block ends, and no decoding thread outlives the hold."""
        opened = await self._open_all(urls)
        decoded: list[Image.Image] = []
        try:
            pixels = sum(image.size[0] * image.size[1] for image in opened)
            try:
                self.budget.check(pixels)
            except PixelBudgetExceeded as exc:
                raise MediaError(f"{exc} the server decodes at once", param="messages") from None
            async with self.budget.hold(pixels):
                decoded = await _decode_all(opened, [param for _, param in urls])
                yield decoded
        finally:
            for image in (*opened, *decoded):
                image.close()

    async def _open_all(self, urls: list[tuple[str, str]]) -> list[Image.Image]:
        if not urls:
            return []
        tasks = [asyncio.ensure_future(self.open(url, param)) for url, param in urls]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()  # the rest, after a failure or when the caller is cancelled
            await asyncio.wait(tasks)
        return _images_or_first_error(tasks)

    async def open(self, url: str, param: str | None = None) -> Image.Image:
        """Fetched and header-checked, not decoded."""
        try:
            data = await self.read_bytes(url)
            return await asyncio.to_thread(open_image, data, self.policy.max_image_pixels)
        except MediaError as exc:
            exc.param = exc.param or param
            raise

    async def load(self, url: str, param: str | None = None) -> Image.Image:
        """One image, fetched and decoded (outside the pixel budget)."""
        return await _decode(await self.open(url, param), param)

    async def read_bytes(self, url: str) -> bytes:
        scheme = url[: url.find(":")].lower() if ":" in url[:10] else ""
        if scheme == "data":
            return await asyncio.to_thread(decode_data_url, url, self.policy.max_base64_chars)
        if scheme in ("http", "https"):
            return await self.fetch(url)
        if scheme == "file":
            return await asyncio.to_thread(read_local_file, url, self.policy)
        raise MediaError("image_url must be an http(s):// URL or a data:image/...;base64 URL")

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.policy.fetch_timeout):
                return await self._fetch_following_redirects(url)
        except TimeoutError as exc:
            raise MediaError(f"fetching the image took longer than {self.policy.fetch_timeout:g}s") from exc
        except httpx.TimeoutException as exc:
            raise MediaError("timed out connecting to the image server") from exc
        except httpx.HTTPError as exc:
            raise MediaError(f"could not fetch the image ({type(exc).__name__})") from exc

    async def _fetch_following_redirects(self, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            response_or_next = await self._fetch_once(url)
            if isinstance(response_or_next, bytes):
                return response_or_next
            url = response_or_next
        raise MediaError(f"the image URL redirected more than {self.policy.max_redirects} times")

    async def _fetch_once(self, url: str) -> bytes | str:
        """The body, or the next URL when the server redirects."""
        target = parse_url(url)
        if target.scheme not in ("http", "https") or not target.host:
            raise MediaError("image URLs (and their redirects) must be http(s):// URLs with a host")
        if target.userinfo:
            raise MediaError("image URLs must not carry credentials")
        if not host_allowed(target.host, self.policy):
            raise MediaError(f"image host '{target.host}' is not in the allowed list")
        port = target.port or (443 if target.scheme == "https" else 80)
        ip = await resolve_checked(target.host, port, self.policy)
        pinned = target.copy_with(host=str(ip))
        headers = {"Host": target.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity",
                   "User-Agent": "ovis2-serve"}  # fmt: skip
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        timeout = httpx.Timeout(self.policy.fetch_timeout, connect=self.policy.connect_timeout)
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False, transport=self.transport
        ) as client:
            request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                if response.status_code in REDIRECT_CODES and "location" in response.headers:
                    return urljoin(url, response.headers["location"])
                if response.status_code != 200:
                    raise MediaError(f"the image server answered HTTP {response.status_code}")
                return await self._read_capped(response)
            finally:
                await response.aclose()

    async def _read_capped(self, response: httpx.Response) -> bytes:
        cap = self.policy.max_image_bytes
        # httpx would inflate gzip, deflate (or nested "gzip, gzip") whole chunks before the cap below saw them: a
        # 1 KB body can inflate to gigabytes. Identity was asked for; anything else is refused and never decoded.
        if response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            raise MediaError("the image server sent a compressed (Content-Encoding) response; refused")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise MediaError(f"the image is larger than {cap} bytes")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise MediaError(f"the image is larger than {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


async def _decode_all(opened: list[Image.Image], params: list[str | None]) -> list[Image.Image]:
    """Each image decoded in a thread. Every thread is waited for, also when one fails or the caller is cancelled
    (their pixels are what the budget counts); then the images in order, or the first failure in part order."""
    tasks = [asyncio.ensure_future(_decode(image, param)) for image, param in zip(opened, params, strict=True)]
    if tasks:
        await wait_even_if_cancelled(tasks)
    return _images_or_first_error(tasks)


async def _decode(image: Image.Image, param: str | None) -> Image.Image:
    try:
        return await asyncio.to_thread(decode_pixels, image)
    except MediaError as exc:
        exc.param = exc.param or param
        raise


def _images_or_first_error(tasks: list[asyncio.Task]) -> list[Image.Image]:
    """The images the (finished) tasks made, in order; if any task failed or was cancelled, the images that were
    made are closed and the first failure in part order is raised."""
    ran = [task for task in tasks if not task.cancelled()]
    images = [task.result() for task in ran if task.exception() is None]
    errors = [task.exception() for task in ran if task.exception() is not None]
    if errors or len(images) < len(tasks):
        for image in images:
            image.close()
        raise errors[0] if errors else asyncio.CancelledError()
    return images


async def wait_even_if_cancelled(tasks) -> None:
    """Wait until every task is done; a cancellation of the caller is passed on only after that."""
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        await asyncio.wait(tasks)
        raise


async def finish_in_thread(function, *args):
    """function(*args) in a thread, which a cancellation of the caller waits for (so that what the thread uses,
    such as decoded images under the pixel budget, is not released under it)."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    await wait_even_if_cancelled([task])
    return task.result()


def parse_url(url: str) -> httpx.URL:
    """httpx's parse of `url`; a malformed one (bad port or IPv4 literal, bad IDNA, control characters) is a 400."""
    try:
        parsed = httpx.URL(url)
        _ = parsed.host  # decoding a punycode host can fail too
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors
        raise MediaError("the image URL is not a valid URL") from exc
    return parsed


def decode_data_url(url: str, max_base64_chars: int) -> bytes:
    match = _DATA_URL.match(url[:256])
    if match is None or ";base64" not in (match.group("params") or "").lower():
        raise MediaError("data URLs must look like data:image/png;base64,<data>")
    mime = (match.group("mime") or "").lower()
    if mime not in DATA_URL_TYPES:
        raise MediaError(f"data URL type '{mime or 'none'}' is not supported; use png, jpeg, webp, gif or bmp")
    payload = url[match.end() :]
    if len(payload) > max_base64_chars:
        raise MediaError(f"the base64 image is longer than {max_base64_chars} characters")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("the data URL is not valid base64") from exc
    return data


def read_local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.local_dir is None:
        raise MediaError("file:// image URLs are disabled on this server")
    try:
        parts = urlsplit(url)
        path = Path(unquote(parts.path)).resolve()
    except (ValueError, RuntimeError) as exc:  # a malformed netloc, a NUL byte, a symlink loop
        raise MediaError("the file:// URL is not a valid path") from exc
    if parts.netloc not in ("", "localhost"):
        raise MediaError("file:// URLs must name a local path")
    if not path.is_relative_to(policy.local_dir) or not path.is_file():
        raise MediaError("file:// image is not a file inside the allowed directory")
    try:
        with path.open("rb") as file:
            data = file.read(policy.max_image_bytes + 1)  # bounded even if the file grows after the check
    except OSError as exc:
        raise MediaError("the file:// image cannot be read") from exc
    if len(data) > policy.max_image_bytes:
        raise MediaError(f"the image is larger than {policy.max_image_bytes} bytes")
    return data


# -------------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from encoded bytes: allowed formats only, pixel cap checked before decoding."""
    return decode_pixels(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with its header read and checked (allowed format, 1 to max_pixels pixels); not decoded yet."""
    if not data:
        raise MediaError("the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise MediaError("the image is not a png, jpeg, webp, gif or bmp file") from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"the image has more than {max_pixels} pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError("the image file is corrupt") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError("the image has no pixels")
    if width * height > max_pixels:
        raise MediaError(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")
    return image


def decode_pixels(image: Image.Image) -> Image.Image:
    """The first frame of an opened image, decoded, turned upright by its EXIF orientation, in RGB: the image
    itself when it is RGB already, else a new image (and the opened one is closed)."""
    try:
        image.seek(0)  # the first frame of an animation
        ImageOps.exif_transpose(image, in_place=True)  # as displayed (and as transformers' load_image does)
        if image.mode == "RGB":
            return image
        rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise MediaError("the image file is corrupt or truncated") from exc
    image.close()
    return rgb
