"""Vectorised 64-bit hashing shared by the dedup stages: mixing, group ids, string and span hashes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_BASE = 0x9E3779B97F4A7C15 | 1  # odd, so invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def group_ids(part: int, columns: np.ndarray) -> np.ndarray:
    """int64 group id per row of ``columns`` (uint64, shape rows or rows x k), salted by ``part``
    (band or chunk index) so equal values in different parts never share a group."""
    columns = np.asarray(columns, np.uint64)
    if columns.ndim == 1:
        columns = columns[:, None]
    h = np.full(columns.shape[0], mix64(np.uint64(part)), np.uint64)
    for j in range(columns.shape[1]):
        h = mix64(h ^ columns[:, j])
    return h.view(np.int64)


_POWERS: tuple[np.ndarray, np.ndarray] = (np.ones(1, np.uint64), np.ones(1, np.uint64))  # see _powers


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``B**k`` and ``B**-k`` mod 2**64 for k < ``n``, computed once per process and grown by doubling."""
    global _POWERS
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]))
        with np.errstate(over="ignore"):
            _POWERS = tuple(np.cumprod(np.r_[np.uint64(1), np.full(size - 1, base, np.uint64)]) for base in (_BASE, _BASE_INV))
    return _POWERS[0][:n], _POWERS[1][:n]


def span_hashes(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """64-bit hash of each byte span ``data[start:end]``: mix64 of the polynomial hash
    sum(data[k] * B**(end-1-k)) mod 2**64, all spans at once from one prefix sum."""
    powers, inverse = _powers(len(data) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(data) + 1, np.uint64)
        np.cumsum(data.astype(np.uint64) * inverse[:-1], out=prefix[1:])
        poly = powers[end - 1] * (prefix[end] - prefix[start])
    return mix64(poly ^ (end - start).astype(np.uint64))


def string_hashes(strings: pa.Array) -> np.ndarray:
    """uint64 hash of each string's UTF-8 bytes (null hashes as the empty string)."""
    strings = pc.fill_null(strings.cast(pa.large_string()), "")
    strings = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2] or b"", np.uint8)
    return span_hashes(data, offsets[:-1], offsets[1:])
