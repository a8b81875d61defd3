"""One writer per output: a lease file ``OUT/_lease.json`` (owner, host, pid, heartbeat) that a run
creates atomically before it writes and removes when it ends.

The create is exclusive on every filesystem that has one: a hard link on a local disk (and NFS),
a conditional put (``If-None-Match: *``) on S3 through s3fs. A live lease refuses a second run in one
line naming its holder. A stale one is taken over: its heartbeat is older than :data:`STALE_AFTER`
seconds, or its holder ran on this host and its process is gone (a killed run), or it is this process's own.
"""

from __future__ import annotations

import getpass
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

LEASE = "_lease.json"
STALE_AFTER = 120.0  # seconds without a heartbeat after which a lease is taken over
HEARTBEAT = STALE_AFTER / 4


@dataclass
class Lease:
    """A lease this process holds on an output folder; a daemon thread renews its heartbeat until :meth:`release`."""

    fs: AbstractFileSystem
    path: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def record(self) -> dict:
        return {"token": self.token, "owner": _owner(), "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            if _read(self.fs, self.path).get("token") != self.token:
                return  # taken over (this process was stalled past STALE_AFTER): stop renewing another's lease
            try:
                _write(self.fs, self.path, self.record())
            except OSError:
                continue  # the next beat tries again; the lease goes stale only after STALE_AFTER

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this process's."""
        self._stop.set()
        if _read(self.fs, self.path).get("token") == self.token:
            self.fs.rm(self.path)


def acquire(fs: AbstractFileSystem, root: str) -> Lease:
    """Take the lease on the output folder ``root``; UsageError naming the holder of a live one."""
    lease = Lease(fs, f"{root}/{LEASE}")
    for _ in range(3):  # a takeover races another run's: the loser finds a fresh lease the next time round
        try:
            _create(fs, lease.path, lease.record())
            break
        except FileExistsError:
            held = _read(fs, lease.path)
            if not _stale(held):
                raise UsageError(
                    f"{root} is being written by another run ({held.get('owner')} on {held.get('host')}, pid {held.get('pid')},"
                    f" heartbeat {time.time() - held.get('heartbeat', 0):.0f} s ago); wait for it, stop it, or remove {lease.path}"
                    " if that run is gone"
                ) from None
            fs.rm(lease.path)
        except OSError as e:
            raise UsageError(f"cannot write to the output folder {root}: {e.strerror or e}") from None
    else:
        raise UsageError(f"cannot take the lease {lease.path}: other runs keep taking it")
    threading.Thread(target=lease._beat, name="mmcurate-lease", daemon=True).start()
    return lease


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
        tmp = _temporary(path)
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
        tmp = _temporary(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _temporary(path: str) -> str:
    """A temporary name beside ``path`` in the layout's form, so a killed run's leftover is cleaned up."""
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"


def _read(fs: AbstractFileSystem, path: str) -> dict:
    try:
        record = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
