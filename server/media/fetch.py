"""MediaFetcher: the bytes behind a media URL under a MediaPolicy, for one kind of media (IMAGE or VIDEO: its
data URL types, byte cap and download timeout).

- `data:<type>;base64,...` with a length cap.
- `http(s)://`: the host is resolved once and the connection goes to the address that was checked (the URL
  is rewritten to the IP, with the Host header and TLS SNI set to the name, so no second DNS lookup can
  swap in another address); every redirect is checked again (at most a few); connect and total timeouts;
  the byte cap is enforced while streaming, on bytes that are never inflated (compressed responses are
  refused); an optional host allow-list.
- `file://` only inside a directory the operator names.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from .byte_budget import BytesHold
from .errors import MediaError
from .policy import MediaPolicy, host_allowed, resolve_checked

DATA_URL_TYPES = {
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/x-ms-bmp",
}
VIDEO_DATA_URL_TYPES = {"video/mp4", "video/webm", "video/quicktime", "video/x-matroska"}
REDIRECT_CODES = (301, 302, 303, 307, 308)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class MediaKind:
    noun: str  # "image" or "video", in messages
    data_url_types: frozenset[str]
    type_names: str  # the data URL types, for messages


IMAGE = MediaKind("image", frozenset(DATA_URL_TYPES), "png, jpeg, webp, gif or bmp")
VIDEO = MediaKind("video", frozenset(VIDEO_DATA_URL_TYPES), "mp4, webm, quicktime or x-matroska")


@dataclass
class MediaFetcher:
    """Reads data:, http(s):// and file:// URLs into bytes, within the policy's limits for `kind`."""

    policy: MediaPolicy = field(default_factory=MediaPolicy)
    transport: httpx.AsyncBaseTransport | None = None  # tests may inject one
    kind: MediaKind = IMAGE
    hold: BytesHold | None = None  # the request's share of the media bytes in flight, taken as bytes arrive

    @property
    def max_bytes(self) -> int:
        return self.policy.max_video_bytes if self.kind is VIDEO else self.policy.max_image_bytes

    @property
    def timeout(self) -> float:
        return self.policy.video_fetch_timeout if self.kind is VIDEO else self.policy.fetch_timeout

    async def read_bytes(self, url: str) -> bytes:
        scheme = url[: url.find(":")].lower() if ":" in url[:10] else ""
        if scheme == "data":
            data = await asyncio.to_thread(decode_data_url, url, (self.max_bytes + 2) // 3 * 4, self.kind)
            return self._held(data)
        if scheme in ("http", "https"):
            return await self.fetch(url)
        if scheme == "file":
            data = await asyncio.to_thread(read_local_file, url, self.policy, self.max_bytes, self.kind.noun)
            return self._held(data)
        noun = self.kind.noun
        raise MediaError(f"{noun}_url must be an http(s):// URL or a data:{noun}/...;base64 URL")

    async def fetch(self, url: str) -> bytes:
        noun = self.kind.noun
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch_following_redirects(url)
        except TimeoutError as exc:
            raise MediaError(f"fetching the {noun} took longer than {self.timeout:g}s") from exc
        except httpx.TimeoutException as exc:
            raise MediaError(f"timed out connecting to the {noun} server") from exc
        except httpx.InvalidURL as exc:  # httpx parses a redirect's Location even when it does not follow it
            raise MediaError(f"the {noun} server redirected to a URL that cannot be fetched") from exc
        except httpx.HTTPError as exc:
            raise MediaError(f"could not fetch the {noun} ({type(exc).__name__})") from exc

    async def _fetch_following_redirects(self, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            response_or_next = await self._fetch_once(url)
            if isinstance(response_or_next, bytes):
                return response_or_next
            url = response_or_next
        raise MediaError(f"the {self.kind.noun} URL redirected more than {self.policy.max_redirects} times")

    async def _fetch_once(self, url: str) -> bytes | str:
        """The body, or the next URL when the server redirects."""
        target, noun = parse_url(url), self.kind.noun
        if target.scheme not in ("http", "https") or not target.host:
            raise MediaError(f"{noun} URLs (and their redirects) must be http(s):// URLs with a host")
        if target.userinfo:
            raise MediaError(f"{noun} URLs must not carry credentials")
        if not host_allowed(target.host, self.policy):
            raise MediaError(f"{noun} host '{target.host}' is not in the allowed list")
        port = target.port or (443 if target.scheme == "https" else 80)
        ip = await resolve_checked(target.host, port, self.policy)
        pinned = target.copy_with(host=str(ip))
        headers = {
            "Host": target.netloc.decode("ascii"),
            "Accept": f"{noun}/*",
            "Accept-Encoding": "identity",
            "User-Agent": "ovis2-serve",
        }
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
                    raise MediaError(f"the {noun} server answered HTTP {response.status_code}")
                return await self._read_capped(response)
            finally:
                await response.aclose()

    def _held(self, data: bytes) -> bytes:
        if self.hold is not None:
            self.hold.take(len(data))
        return data

    async def _read_capped(self, response: httpx.Response) -> bytes:
        cap, noun = self.max_bytes, self.kind.noun
        # httpx would inflate gzip, deflate (or nested "gzip, gzip") whole chunks before the cap below saw them: a
        # 1 KB body can inflate to gigabytes. Identity was asked for; anything else is refused and never decoded.
        if response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            raise MediaError(f"the {noun} server sent a compressed (Content-Encoding) response; refused")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise MediaError(f"the {noun} is larger than {cap} bytes")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise MediaError(f"the {noun} is larger than {cap} bytes")
            self._held(chunk)
            chunks.append(chunk)
        return b"".join(chunks)


def parse_url(url: str) -> httpx.URL:
    """httpx's parse of `url`; a malformed one (bad port or IPv4 literal, bad IDNA, control characters) is a 400."""
    try:
        parsed = httpx.URL(url)
        _ = parsed.host  # decoding a punycode host can fail too
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors
        raise MediaError("the image URL is not a valid URL") from exc
    return parsed


def decode_data_url(url: str, max_base64_chars: int, kind: MediaKind = IMAGE) -> bytes:
    match = _DATA_URL.match(url[:256])
    example = "data:image/png;base64,<data>" if kind is IMAGE else "data:video/mp4;base64,<data>"
    if match is None or ";base64" not in (match.group("params") or "").lower():
        raise MediaError(f"data URLs must look like {example}")
    mime = (match.group("mime") or "").lower()
    if mime not in kind.data_url_types:
        raise MediaError(f"data URL type '{mime or 'none'}' is not supported; use {kind.type_names}")
    payload = url[match.end() :]
    if len(payload) > max_base64_chars:
        raise MediaError(f"the base64 {kind.noun} is longer than {max_base64_chars} characters")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("the data URL is not valid base64") from exc
    return data


def read_local_file(
    url: str, policy: MediaPolicy, max_bytes: int | None = None, noun: str = "image"
) -> bytes:
    max_bytes = policy.max_image_bytes if max_bytes is None else max_bytes
    if policy.local_dir is None:
        raise MediaError(f"file:// {noun} URLs are disabled on this server")
    try:
        parts = urlsplit(url)
        path = Path(unquote(parts.path)).resolve()
    except (ValueError, RuntimeError) as exc:  # a malformed netloc, a NUL byte, a symlink loop
        raise MediaError("the file:// URL is not a valid path") from exc
    if parts.netloc not in ("", "localhost"):
        raise MediaError("file:// URLs must name a local path")
    if not path.is_relative_to(policy.local_dir) or not path.is_file():
        raise MediaError(f"file:// {noun} is not a file inside the allowed directory")
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)  # bounded even if the file grows after the check
    except OSError as exc:
        raise MediaError(f"the file:// {noun} cannot be read") from exc
    if len(data) > max_bytes:
        raise MediaError(f"the {noun} is larger than {max_bytes} bytes")
    return data
