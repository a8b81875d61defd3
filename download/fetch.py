"""The async HTTP client: one aiohttp session per batch, bounded in time, size, redirects and peers.

:meth:`Fetcher.fetch` never raises: it returns the body or a fixed reason (``http_404``, ``timeout``,
``too_slow``, ``too_large``, ``opted_out``, ``blocked_address``, ``redirect_loop``, ...). Redirects are followed
here, not by aiohttp, so every hop's URL is checked; every connection, first or after a redirect,
goes through :func:`~mmcurate.download.urls.safe_socket_factory`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mmcurate.download.config import DownloadConfig
from mmcurate.download.urls import BlockedAddress, check_url, safe_socket_factory

REDIRECTS = (301, 302, 303, 307, 308)
BACKOFF_S = 0.5  # first retry wait; doubles with each retry
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Fetched:
    """A body (status ``ok``) or the reason there is none."""

    status: str
    data: bytes | None = None
    retryable: bool = False
    retry_after: float | None = None


def opted_out(values: Iterable[str], token: str, directives: tuple[str, ...]) -> bool:
    """Whether X-Robots-Tag ``values`` hold a disallowed directive for everyone or for ``token``.

    ``X-Robots-Tag: noai`` and ``X-Robots-Tag: mmcurate: noimageai`` opt out;
    ``X-Robots-Tag: otherbot: noai`` does not.
    """
    if not directives:
        return False
    token = token.lower()
    for value in values:
        agent, sep, rest = value.partition(":")
        agent = agent.strip().lower()
        if sep and agent and not any(c in agent for c in ", "):  # "bot: noai"; not "noindex, unavailable_after: ..."
            if agent != token:
                continue
            value = rest
        if any(d.strip().lower() in directives for d in value.split(",")):
            return True
    return False


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


class TooSlow(Exception):
    """The body arrived slower than ``min_speed`` over a ``min_speed_window``."""


class SpeedWatch:
    """Ends a body that grows by fewer than ``min_speed * window`` bytes in some window of ``window`` seconds.

    One timer per window, checked when it fires: a fast body costs one timer, a trickle ends after one window.
    The pending read of ``stream`` then raises :class:`TooSlow`.
    """

    def __init__(self, stream: aiohttp.StreamReader, body: bytearray, min_speed: int, window: float) -> None:
        self.stream, self.body, self.need, self.window = stream, body, min_speed * window, window
        self.mark = 0
        self.handle = asyncio.get_running_loop().call_later(window, self._check)

    def _check(self) -> None:
        if len(self.body) - self.mark < self.need:
            self.stream.set_exception(TooSlow())
            return
        self.mark = len(self.body)
        self.handle = asyncio.get_running_loop().call_later(self.window, self._check)

    def cancel(self) -> None:
        self.handle.cancel()


class Fetcher:
    """Fetches URLs over one pooled session; use as ``async with Fetcher(config) as f``."""

    def __init__(self, config: DownloadConfig) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:  # noqa: PYI034 -- typing.Self needs Python 3.11
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency,
            limit_per_host=cfg.per_host_connections,
            ttl_dns_cache=300,
            socket_factory=safe_socket_factory(cfg.allow_private_networks),
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout, sock_read=cfg.timeout),
            headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: URL) -> Fetched:
        """The body of ``url`` after redirects and retries, within the per-URL deadline."""
        try:
            return await asyncio.wait_for(self._with_retries(url), self.config.deadline)
        except asyncio.TimeoutError:
            return Fetched("timeout")

    async def _with_retries(self, url: URL) -> Fetched:
        cfg = self.config
        loop = asyncio.get_running_loop()
        end = loop.time() + cfg.deadline
        for attempt in range(cfg.retries + 1):
            result = await self._follow(url)
            if not result.retryable or attempt == cfg.retries:
                break
            wait = BACKOFF_S * 2**attempt if result.retry_after is None else result.retry_after
            if wait > cfg.retry_after_cap or loop.time() + wait >= end:
                break
            await asyncio.sleep(wait)
        return Fetched(result.status, result.data)

    async def _follow(self, url: URL) -> Fetched:
        seen = {url}
        for _ in range(self.config.max_redirects + 1):
            result = await self._request(url)
            if isinstance(result, Fetched):
                return result
            if result in seen:
                return Fetched("redirect_loop")
            seen.add(result)
            url = result
        return Fetched("too_many_redirects")

    async def _request(self, url: URL) -> Fetched | URL:
        """One HTTP exchange: a body, a reason, or the URL a redirect points to."""
        assert self.session is not None
        cfg = self.config
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        return Fetched(f"http_{resp.status}")
                    target, reason = check_url(resp.url.join(URL(location)))
                    return target if target is not None else Fetched(reason or "bad_url")
                if resp.status not in (200, 203):
                    retryable = resp.status == 429 or resp.status >= 500
                    return Fetched(
                        f"http_{resp.status}", retryable=retryable, retry_after=parse_retry_after(resp.headers.get("Retry-After"))
                    )
                if opted_out(resp.headers.getall("X-Robots-Tag", ()), cfg.user_agent_token, cfg.disallowed_header_directives):
                    return Fetched("opted_out")
                if resp.content_length is not None and resp.content_length > cfg.max_body_bytes:
                    return Fetched("too_large")
                body = bytearray()
                watch = SpeedWatch(resp.content, body, cfg.min_speed, cfg.min_speed_window) if cfg.min_speed else None
                try:
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        body += chunk
                        if len(body) > cfg.max_body_bytes:
                            return Fetched("too_large")
                except TooSlow:
                    return Fetched("too_slow")
                finally:
                    if watch is not None:
                        watch.cancel()
                return Fetched("ok", bytes(body))
        except aiohttp.ClientConnectorDNSError:
            return Fetched("dns_error")
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, BlockedAddress):
                return Fetched("blocked_address")
            if isinstance(e, aiohttp.ClientSSLError):
                return Fetched("ssl_error")
            return Fetched("connection_error", retryable=True)
        except aiohttp.ServerTimeoutError:
            return Fetched("timeout")
        except aiohttp.InvalidURL:
            return Fetched("bad_url")
        except aiohttp.ClientResponseError:  # a malformed answer (status line, headers): asking again gets the same
            return Fetched("bad_response")
        except aiohttp.ClientError:
            return Fetched("connection_error", retryable=True)
        except (ValueError, UnicodeError):
            return Fetched("bad_response")
