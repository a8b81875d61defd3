"""One writer per output: a lease file ``OUT/_lease.json`` (owner, host, pid, heartbeat) that a run
creates atomically before it writes and removes when it ends.

The create is exclusive on every filesystem that has one: a hard link on a local disk (and NFS),
a conditional put (``If-None-Match: *``) on S3 through s3fs. A live lease refuses a second run in one
line naming its holder. A stale one is taken over: its heartbeat is older than :data:`STALE_AFTER`
seconds, or its holder ran on this host and its process is gone (a killed run), or it is this process's own.

A takeover replaces the stale lease only if it is still the one judged stale, and a heartbeat only if it
is still the one it read, so of the runs that read one lease exactly one replaces it: on S3 a put with
``If-Match`` on the lease's ETag; elsewhere each first creates a marker named for the lease's content
(exclusively, as the lease itself), and the marker's one holder checks the lease is unchanged before it
replaces it in one step. A run stalled past :data:`STALE_AFTER` thus never overwrites a takeover.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from mmcurate.errors import UsageError
from mmcurate.shards.layout import temporary_path

LEASE = "_lease.json"
STALE_AFTER = 120.0  # seconds without a heartbeat after which a lease is taken over
HEARTBEAT = STALE_AFTER / 4
TAKE_ATTEMPTS = 4


@dataclass
class Lease:
    """A lease this process holds on an output folder; a daemon thread renews its heartbeat until :meth:`release`."""

    fs: AbstractFileSystem
    path: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def record(self) -> dict:
        return {"token": self.token, "owner": _owner(), "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def renew(self) -> bool:
        """Renew the heartbeat if the lease is still this process's; whether it is.

        The renewal replaces the lease only if it is unchanged since it was read (as a takeover does), so
        a run stalled past :data:`STALE_AFTER` between the read and the write never overwrites the lease
        another run took over meanwhile.
        """
        version = _version(self.fs, self.path)
        raw = _raw(self.fs, self.path)
        if _parse(raw).get("token") != self.token:
            return False
        return _replace(self.fs, self.path, raw, version, self.record())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                if not self.renew():
                    return  # taken over (this process was stalled past STALE_AFTER): stop renewing another's lease
            except OSError:
                continue  # the next beat tries again; the lease goes stale only after STALE_AFTER

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this process's."""
        self._stop.set()
        if _read(self.fs, self.path).get("token") == self.token:
            self.fs.rm(self.path)


def acquire(fs: AbstractFileSystem, root: str) -> Lease:
    """Take the lease on the output folder ``root``; UsageError naming the holder of a live one."""
    lease = Lease(fs, f"{root.rstrip('/')}/{LEASE}")
    for attempt in range(TAKE_ATTEMPTS):
        try:
            _create(fs, lease.path, lease.record())
            break
        except FileExistsError:
            version = _version(fs, lease.path)  # before the content: a lease rewritten after this no longer matches it
            raw = _raw(fs, lease.path)
            held = _parse(raw)
            if not _stale(held):
                raise UsageError(
                    f"{root} is being written by another run ({held.get('owner')} on {held.get('host')}, pid {held.get('pid')},"
                    f" heartbeat {time.time() - held.get('heartbeat', 0):.0f} s ago); wait for it, stop it, or remove {lease.path}"
                    " if that run is gone"
                ) from None
            if raw is not None and _replace(fs, lease.path, raw, version, lease.record()):
                break
            time.sleep(0.2 * (attempt + 1))  # another run is taking it over: its lease is live the next time round
        except OSError as e:
            raise UsageError(f"cannot write to the output folder {root}: {e.strerror or e}") from None
    else:
        raise UsageError(
            f"cannot take the lease {lease.path}: other runs keep taking it over (a .tmp-*-{LEASE} file beside it that stays"
            " is a leftover of a run killed while taking it over: remove it)"
        )
    threading.Thread(target=lease._beat, name="mmcurate-lease", daemon=True).start()
    return lease


def _replace(fs: AbstractFileSystem, path: str, stale: bytes, version: str | None, record: dict) -> bool:
    """Replace the lease ``stale`` (its raw content; ``version``: its S3 ETag) with ``record`` if it is still
    there; whether this process did (False: another run or the holder changed or removed it first).

    Takeovers and heartbeats both go through here, so of the runs that read one lease exactly one replaces it."""
    data = json.dumps(record).encode()
    if version is not None:  # S3: the put succeeds only if the object is still the stale one
        try:
            fs.pipe_file(path, data, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EINVAL:  # s3fs's PreconditionFailed: another run replaced it first
                return False
            raise
        return True
    marker = temporary_path(path, hashlib.sha256(stale).hexdigest()[:32])  # the same name for every taker of this lease
    try:
        _create(fs, marker, record)
    except FileExistsError:
        return False
    try:
        if _raw(fs, path) != stale:
            return False
        _write(fs, path, record)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(marker)


def _stale(held: dict) -> bool:
    if not held:
        return True  # removed meanwhile, or unreadable (a create killed half-way)
    if time.time() - held.get("heartbeat", 0) > STALE_AFTER:
        return True
    if held.get("host") != socket.gethostname():
        return False
    pid = held.get("pid")
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, TypeError):
        return False
    return False


def _owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _create(fs: AbstractFileSystem, path: str, record: dict) -> None:
    """Create ``path`` holding ``record``; FileExistsError if it exists (atomically where the filesystem allows)."""
    data = json.dumps(record).encode()
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if isinstance(fs, LocalFileSystem):  # written whole under a temporary name, then hard-linked: exclusive, and never seen half-written
        tmp = temporary_path(path)
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)
    else:
        fs.pipe_file(path, data, mode="create")  # s3fs: a put with If-None-Match: *


def _write(fs: AbstractFileSystem, path: str, record: dict) -> None:
    """Replace the lease's content in one step (a rename on a local disk, a put on an object store)."""
    data = json.dumps(record).encode()
    if isinstance(fs, LocalFileSystem):
        tmp = temporary_path(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _version(fs: AbstractFileSystem, path: str) -> str | None:
    """The lease object's ETag on S3 (which takes a put conditional on it), else None."""
    if "s3" not in fs.protocol:
        return None
    try:
        return fs.info(path).get("ETag")
    except OSError:
        return None


def _raw(fs: AbstractFileSystem, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except OSError:
        return None


def _parse(raw: bytes | None) -> dict:
    try:
        record = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _read(fs: AbstractFileSystem, path: str) -> dict:
    return _parse(_raw(fs, path))
