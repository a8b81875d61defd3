"""Pieces of a global step passed between local processes as files: the process that makes a piece
writes it (pickle protocol 5, its arrays' buffers out of band, each at an aligned offset) and the
one that takes it maps the file, so numpy arrays and Arrow tables are read without a copy and only
the file's name goes through the driver (a pipe copies every byte twice, driver in between)."""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass

_ALIGN = 64
_HEAD = struct.Struct("<Q")


def _aligned(size: int) -> int:
    """``size`` rounded up to a multiple of ``_ALIGN``."""
    return -(-size // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class StoredPiece:
    """A piece written to ``path`` by :func:`store`."""

    path: str


def store(piece: object, folder: str) -> StoredPiece:
    """Write ``piece`` to a new file in ``folder``."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(piece, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    offsets, offset = [], 0
    for raw in raws:
        offsets.append(offset)
        offset += _aligned(raw.nbytes)
    meta = pickle.dumps((body, offsets, [raw.nbytes for raw in raws]))
    start = _aligned(_HEAD.size + len(meta))
    fd, path = tempfile.mkstemp(dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(_HEAD.pack(len(meta)) + meta)
        for at, raw in zip(offsets, raws, strict=True):
            f.seek(start + at)
            f.write(raw)
    return StoredPiece(path)


def load(stored: StoredPiece) -> object:
    """The piece in ``stored``, its buffers read-only views of the mapped file."""
    with open(stored.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    (size,) = _HEAD.unpack_from(view)
    body, offsets, sizes = pickle.loads(view[_HEAD.size : _HEAD.size + size])
    start = _aligned(_HEAD.size + size)
    return pickle.loads(body, buffers=[view[start + at : start + at + n] for at, n in zip(offsets, sizes, strict=True)])
