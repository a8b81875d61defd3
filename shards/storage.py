"""Filesystems of input and output paths (fsspec), with one clear line when a path's driver is missing or its
object store cannot be reached, or a destination cannot be written (:func:`check_destination`)."""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from mmcurate.errors import UsageError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # URL protocol -> the mmcurate extra that installs its driver
SETTINGS = {"s3": "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...", "gcs": "GOOGLE_APPLICATION_CREDENTIALS, ..."}  # what each driver reads
_REACHED: set[str] = set()  # the object-store URLs this process has reached


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs``; UsageError naming the extra to install when the protocol's driver is missing,
    and (once per URL and process) when the object store cannot be reached.

    Object stores get no listing cache: a driver lists a folder (e.g. for leftovers of a killed run), then
    its workers write into it, and a cached listing would hide their files from it (s3fs answers ``info``,
    ``exists`` and ``open`` from a cached listing of the parent: FileNotFoundError for a file written since).
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = {"use_listings_cache": False} if protocol in EXTRAS else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        hint = f'pip install "mmcurate[{extra}]"' if extra else str(e)
        raise UsageError(f"{url}: {protocol}:// paths need a driver that is not installed; {hint}") from None
    except ValueError as e:
        if not str(e).startswith("Protocol not known"):
            raise
        raise UsageError(
            f"{url}: unknown URL scheme {protocol}:// (fsspec has no driver of that name; e.g. s3://, gs://, https:// or a local path)"
        ) from None
    except OSError as e:  # a driver that cannot start here (hdfs:// without Java) or a server it cannot reach
        raise UsageError(
            f"{url}: cannot open {protocol}:// paths here ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
        ) from None
    if protocol in EXTRAS and url not in _REACHED:
        _reach(fs, path, url, SETTINGS[EXTRAS[protocol]])
        _REACHED.add(url)
    return fs, path


def _reach(fs: AbstractFileSystem, path: str, url: str, settings: str) -> None:
    """Ask the store for ``path`` once, before anything reads or writes there: an unreachable endpoint, missing
    or refused credentials are one line (UsageError), not the client library's traceback halfway through a run.
    A path that does not exist is an answer (a new output, or an input the reader reports)."""
    try:
        fs.info(path)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 -- botocore and gcsfs raise their own types for a dead endpoint or bad credentials
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot reach {url}: {cause}; check the store's endpoint and credentials ({settings})") from None


def check_destination(url: str, what: str, *, folder: bool) -> None:
    """UsageError, one line, when ``url`` cannot be written: as a new file (``folder`` False) it is a folder,
    as a folder it is a file, or (local paths) the nearest existing path above it is a file or a folder
    this process cannot write into. Nothing is created; call it before the work that ends in the write."""
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if not url:
        raise UsageError(f"{what} is empty: name a {kind}")
    fs, path = url_to_fs(url)
    local = isinstance(fs, LocalFileSystem)
    if fs.exists(path):
        if fs.isdir(path) != folder:
            raise UsageError(f"cannot write {what} {url}: a {other}, not a {kind}")
        above = path if folder else os.path.dirname(path)
    else:
        above = os.path.dirname(path)
        while local and not os.path.lexists(above):
            above = os.path.dirname(above)
        if local and not os.path.isdir(above):
            raise UsageError(f"cannot write {what} {url}: {above} is a file, not a folder")
    if local and not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {url}: no write permission in {above}")
