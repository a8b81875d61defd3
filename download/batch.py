"""Download a batch of URLs: many fetches in flight on one event loop, image work in a thread pool.

Concurrency is bounded twice: at most ``per_host_connections`` samples of one host and at most
``concurrency`` samples overall are in flight (fetching or being decoded), which also bounds the
memory held in downloaded bodies. A sample's deadline starts when it gets its slot, so waiting in
the queue never counts against it. A host that keeps failing is paused by the
:class:`~mmcurate.download.breaker.HostBreaker`, and its queued samples end at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from mmcurate.download.breaker import REFUSED, Admission, HostBreaker
from mmcurate.download.config import DownloadConfig
from mmcurate.download.fetch import Fetcher
from mmcurate.download.images import Encoded, process_image
from mmcurate.download.urls import parse_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What became of one URL: ``status`` is ``ok`` or the rejection reason."""

    status: str
    image: Encoded | None = None
    sha256: str | None = None


def _decode(data: bytes, config: DownloadConfig) -> Outcome:
    sha256 = hashlib.sha256(data).hexdigest()
    result = process_image(data, config)
    if isinstance(result, str):
        return Outcome(result, sha256=sha256)
    return Outcome("ok", result, sha256)


async def download_batch(urls: Sequence[object], config: DownloadConfig, pool: Executor, breaker: HostBreaker) -> list[Outcome]:
    """One :class:`Outcome` per URL, in order; never raises for a bad URL, server or image."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(config.concurrency)
    hosts: defaultdict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(config.per_host_connections))

    async with Fetcher(config) as fetcher:

        async def one(raw: object) -> Outcome:
            url, reason = parse_url(raw)
            if url is None:
                return Outcome(reason or "bad_url")
            host = url.host or ""
            async with hosts[host]:
                admission = await breaker.admit(host)
                if admission is Admission.REFUSE:
                    return Outcome(REFUSED)
                status = "download_error"
                try:
                    async with slots:
                        fetched = await fetcher.fetch(url)
                        status = fetched.status
                        if fetched.data is None:
                            return Outcome(fetched.status)
                        return await loop.run_in_executor(pool, _decode, fetched.data, config)
                except Exception:  # a bug in a library must cost one row, not the shard
                    log.warning("unexpected error downloading %s", url, exc_info=True)
                    return Outcome("download_error")
                finally:
                    breaker.report(host, status, admission)

        return list(await asyncio.gather(*(one(u) for u in urls)))
