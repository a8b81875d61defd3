"""Filesystems of input and output paths (fsspec), with one clear line when a path's driver is missing."""

from __future__ import annotations

import fsspec
from fsspec.spec import AbstractFileSystem

from mmcurate.errors import UsageError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # URL protocol -> the mmcurate extra that installs its driver


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs``; UsageError naming the extra to install when the protocol's driver is missing."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        extra = EXTRAS.get(protocol)
        hint = f'pip install "mmcurate[{extra}]"' if extra else str(e)
        raise UsageError(f"{url}: {protocol}:// paths need a driver that is not installed; {hint}") from None
