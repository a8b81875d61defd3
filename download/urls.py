"""URL checks and address safety: which URLs may be fetched and which peers may be connected to.

URL syntax is checked before any network work (``bad_url``, ``bad_scheme``). Address safety is
enforced where the connection is made: :func:`safe_socket_factory` sees every address the HTTP
client is about to connect to, whether the host was an IP literal or a name resolved by DNS, for the
first request and after every redirect, so a public name that resolves to ``127.0.0.1`` (or is
re-bound to it) is refused as well.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from yarl import URL

SCHEMES = ("http", "https")
MAX_URL_CHARS = 8192


class BlockedAddress(OSError):
    """The peer address is loopback, private, link-local, multicast or reserved."""


def parse_url(raw: Any) -> tuple[URL | None, str | None]:
    """``(url, None)`` for a fetchable http(s) URL, else ``(None, reason)``."""
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_URL_CHARS:
        return None, "bad_url"
    try:
        url = URL(raw.strip())
    except (ValueError, TypeError):
        return None, "bad_url"
    return check_url(url)


def check_url(url: URL) -> tuple[URL | None, str | None]:
    """The scheme and host checks of :func:`parse_url`, also applied to every redirect target."""
    if not url.scheme:
        return None, "bad_url"
    if url.scheme not in SCHEMES:
        return None, "bad_scheme"
    try:
        host, port = url.host, url.port
    except ValueError:
        return None, "bad_url"
    if not host or port is None or any(c.isspace() for c in host):
        return None, "bad_url"
    return url, None


def is_blocked(address: str) -> bool:
    """Whether ``address`` (an IP literal) is not a public unicast address.

    IPv4-mapped addresses are judged by their IPv4 address; 6to4 (2002::/16, which embeds an IPv4
    address and routes through relays) and site-local (fec0::/10) addresses are refused outright.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None or ip.is_site_local:
            return True
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global


def safe_socket_factory(allow_private_networks: bool) -> Callable[[tuple], socket.socket]:
    """A socket factory for aiohttp's connector that refuses non-public peers unless allowed."""

    def factory(addr_info: tuple) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        if not allow_private_networks and is_blocked(sockaddr[0]):
            raise BlockedAddress(f"refusing to connect to non-public address {sockaddr[0]}")
        return socket.socket(family=family, type=type_, proto=proto)

    return factory
