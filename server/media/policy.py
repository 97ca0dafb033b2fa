"""Where media may come from: MediaPolicy (the operator's limits), address checks, the host allow-list, and the
DNS lookup that picks the one checked address a fetch then connects to."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..settings import ServerSettings
from .errors import MediaError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
# getaddrinfo blocks a thread until the resolver gives up (tens of seconds for a host whose DNS never answers),
# long after the fetch timed out: in a pool of its own it cannot hold up image decoding and prompt building.
_DNS_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ovis2-dns")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_video_bytes: int = 64 * 1024 * 1024
    video_fetch_timeout: float = 30.0
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
            max_video_bytes=settings.max_video_bytes,
            video_fetch_timeout=settings.video_fetch_timeout,
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
    if (
        ip.is_loopback or ip.is_link_local or ip.is_private or getattr(ip, "is_site_local", False)
    ):  # fec0::/10
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


# ------------------------------------------------------------------------------------------------ resolving


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
        infos = await loop.run_in_executor(
            _DNS_THREADS, partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        )
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
    return MediaError(f"media host '{host}' does not resolve to a public address this server may fetch from")


def _checked(ip: IPAddress, policy: MediaPolicy) -> IPAddress:
    problem = address_problem(ip, policy)
    if problem is not None:
        raise MediaError(f"the media URL points to {problem}; refused")
    return ip
