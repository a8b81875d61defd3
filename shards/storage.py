"""Filesystems of input and output paths (fsspec), with one clear line when a path's driver is missing."""

from __future__ import annotations

import fsspec
from fsspec.spec import AbstractFileSystem

from mmcurate.errors import UsageError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # URL protocol -> the mmcurate extra that installs its driver


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs``; UsageError naming the extra to install when the protocol's driver is missing.

    Object stores get no listing cache: a driver lists a folder (e.g. for leftovers of a killed run), then
    its workers write into it, and a cached listing would hide their files from it (s3fs answers ``info``,
    ``exists`` and ``open`` from a cached listing of the parent: FileNotFoundError for a file written since).
    """
    options = {"use_listings_cache": False} if url.split("://", 1)[0] in EXTRAS else {}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        extra = EXTRAS.get(protocol)
        hint = f'pip install "mmcurate[{extra}]"' if extra else str(e)
        raise UsageError(f"{url}: {protocol}:// paths need a driver that is not installed; {hint}") from None
