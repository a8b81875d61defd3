"""Drop rows whose URL, domain or key is on a user-supplied list (reason ``blocklisted``).

Lists are text files on any fsspec filesystem, one entry per line; blank lines and lines starting
with ``#`` are skipped. A domain entry blocks the domain and all its subdomains (``example.com``
blocks ``cdn.example.com``); ``*.example.com`` and ``.example.com`` mean the same. URLs match
exactly after trimming whitespace; keys match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.stages.base import Resources, Stage, reject


@dataclass
class BlocklistConfig:
    urls: tuple[str, ...] = ()  # files of blocked URLs
    domains: tuple[str, ...] = ()  # files of blocked domains (subdomains included)
    keys: tuple[str, ...] = ()  # files of blocked sample keys

    def __post_init__(self) -> None:
        if not (self.urls or self.domains or self.keys):
            raise ValueError("give at least one list file in urls, domains or keys")


def read_list(path: str, head: bool = False) -> list[str]:
    """The entries of one list file: stripped lines, without blanks and ``#`` comments (with ``head``, of its
    first bytes alone: a check that it can be read)."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            lines = f.read(1024 if head else -1).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"blocklist: cannot read {path!r} ({e})") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def host(url: str | None) -> str | None:
    """The lower-case host name of ``url`` without a trailing dot, or None."""
    if not url:
        return None
    try:
        name = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def _domain(entry: str) -> str:
    entry = entry.lower().removeprefix("*.").lstrip(".").rstrip(".")
    return host(entry) if "://" in entry else entry.split("/", 1)[0]


class Blocklist(Stage):
    """Reject rows whose ``url``, URL host (or a parent domain of it) or ``key`` is listed."""

    name = "blocklist"
    Config = BlocklistConfig
    resources = Resources(cpus=1)
    needs = ("key", "url")

    def check(self) -> None:
        for path in (*self.config.urls, *self.config.domains, *self.config.keys):
            read_list(path, head=True)

    def setup(self) -> None:
        c = self.config
        self._urls = pa.array(sorted({u for p in c.urls for u in read_list(p)}), pa.string())
        self._keys = pa.array(sorted({k for p in c.keys for k in read_list(p)}), pa.string())
        self._domains = {_domain(d) for p in c.domains for d in read_list(p)}

    def process(self, batch: pa.Table) -> pa.Table:
        urls = pc.utf8_trim_whitespace(batch.column("url"))
        blocked = pc.or_(pc.is_in(urls, value_set=self._urls), pc.is_in(batch.column("key"), value_set=self._keys))
        if self._domains:
            blocked = pc.or_(blocked, pa.array([self._blocked_host(host(u)) for u in urls.to_pylist()]))
        return reject(batch, blocked, "blocklisted")

    def _blocked_host(self, name: str | None) -> bool:
        """Whether ``name`` or one of its parent domains is listed."""
        while name:
            if name in self._domains:
                return True
            name = name.partition(".")[2]
        return False
